//! Line charts as standalone SVG: what `bench --plot` and `eval --plot` write. Drawn with
//! `plotters`' SVG backend only (no bitmap backend, no font files): text stays `<text>` elements
//! that the browser sets, so the output is plain text that diffs and opens in any browser.
//! Axes run between round ticks ([`nice_ticks`]) with short labels; one line per series, with a
//! marker at each point when there are few (a one-point series is still visible); a legend under
//! each panel.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    /// `(x, y)` in data units; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// One panel: a title, axis labels and its series.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// Panel size in pixels: two panels side by side fit a laptop screen.
const PANEL_W: u32 = 560;
const PANEL_H: u32 = 380;
/// Room left of the plot for the y tick labels and the rotated y-axis title.
const MARGIN_L: u32 = 78;
const MARGIN_R: u32 = 18;
const MARGIN_T: u32 = 8;
/// Room under the plot for the x tick labels and the x-axis title.
const MARGIN_B: u32 = 50;
/// One legend row per series, under the panel.
const LEGEND_LINE: u32 = 16;
/// Font sizes as plotters takes them: its SVG backend writes `font-size` as the whole part of
/// the size / 1.24, so these are about 12 and 14 px.
const FONT: f64 = 15.0;
const TITLE_FONT: f64 = 17.0;
/// Matplotlib's "tab10" order: distinct hues, the first two (blue, red) for the usual pair.
const COLORS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];
/// Series this short get a marker on every point (bench's few contexts, a one-point series);
/// longer ones (eval's per-bin curves) would drown in them.
const MARKED_POINTS: usize = 16;
const GRID: RGBColor = RGBColor(0xe6, 0xe6, 0xe6);
const FRAME: RGBColor = RGBColor(0x44, 0x44, 0x44);

/// About `target` round tick values (1, 2 or 5 times a power of ten) covering `lo..=hi`.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !lo.is_finite() || !hi.is_finite() {
        return Vec::new();
    }
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    };
    let raw = (hi - lo) / target.max(1) as f64;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    let first = (lo / step).floor() as i64;
    let last = (hi / step).ceil() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

fn label(v: f64) -> String {
    // Drop trailing zeros of a decimal part only ("2.50" -> "2.5", "10" stays "10").
    fn trim(s: String) -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
    let a = v.abs();
    if a >= 1e9 {
        trim(format!("{:.2}", v / 1e9)) + "G"
    } else if a >= 1e6 {
        trim(format!("{:.2}", v / 1e6)) + "M"
    } else if a >= 1e4 {
        trim(format!("{:.1}", v / 1e3)) + "k"
    } else {
        trim(format!("{v:.3}"))
    }
}

/// The charts side by side in one SVG document.
pub fn svg(charts: &[Chart]) -> String {
    let legend_rows = charts.iter().map(|c| c.series.len()).max().unwrap_or(0) as u32;
    let width = PANEL_W * charts.len().max(1) as u32;
    let height = PANEL_H + LEGEND_LINE * legend_rows + 10;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        // Drawing into a String cannot fail: the backend's only errors are its writer's, and
        // the feature-less font's size estimate never fails.
        root.fill(&WHITE).expect("drawing into a String");
        let panels = root.split_evenly((1, charts.len().max(1)));
        for (chart, area) in charts.iter().zip(&panels) {
            panel(area, chart).expect("drawing into a String");
        }
        root.present().expect("drawing into a String");
    }
    out
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    chart: &Chart,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (plot, legend) = area.split_vertically(PANEL_H);
    let finite = |s: &Series| {
        s.points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect::<Vec<_>>()
    };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in chart.series.iter().flat_map(finite) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let empty = x0 > x1;
    // Without data: a unit frame around "no data", under the same title and axis names.
    let (xt, yt) = if empty {
        (vec![0.0, 1.0], vec![0.0, 1.0])
    } else {
        (nice_ticks(x0, x1, 6), nice_ticks(y0.min(0.0), y1, 6))
    };
    let (xa, xb) = (xt[0], xt[xt.len() - 1]);
    let (ya, yb) = (yt[0], yt[yt.len() - 1]);
    let mut ctx = ChartBuilder::on(&plot)
        .caption(&chart.title, ("sans-serif", TITLE_FONT))
        .margin_top(MARGIN_T)
        .margin_right(MARGIN_R)
        .x_label_area_size(MARGIN_B)
        .y_label_area_size(MARGIN_L)
        .build_cartesian_2d(xa..xb, ya..yb)?;
    // The ends are round ticks, so plotters' own round steps (at most this many) land on them.
    let (x_labels, y_labels) = if empty { (0, 0) } else { (xt.len(), yt.len()) };
    ctx.configure_mesh()
        .x_labels(x_labels)
        .y_labels(y_labels)
        .max_light_lines(0)
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .x_label_formatter(&|v| label(*v))
        .y_label_formatter(&|v| label(*v))
        .label_style(("sans-serif", FONT))
        .axis_desc_style(("sans-serif", FONT))
        .bold_line_style(GRID)
        .axis_style(FRAME)
        .draw()?;
    if empty {
        let centre = ((xa + xb) / 2.0, (ya + yb) / 2.0);
        let text = Text::new("no data", centre, text_style(HPos::Center));
        ctx.plotting_area().draw(&text)?;
    }
    for (i, series) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = finite(series);
        if !points.is_empty() {
            let marker = if points.len() <= MARKED_POINTS { 3 } else { 0 };
            ctx.draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(marker))?;
        }
        let y = (LEGEND_LINE * i as u32 + 8) as i32;
        let x = MARGIN_L as i32;
        legend.draw(&Rectangle::new(
            [(x, y - 1), (x + 24, y + 2)],
            color.filled(),
        ))?;
        let text = Text::new(series.label.as_str(), (x + 30, y), text_style(HPos::Left));
        legend.draw(&text)?;
    }
    Ok(())
}

/// Body text, vertically centred on its anchor.
fn text_style(h: HPos) -> TextStyle<'static> {
    TextStyle::from(("sans-serif", FONT).into_font()).pos(Pos::new(h, VPos::Center))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            nice_ticks(0.0, 10.0, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        let t = nice_ticks(1024.0, 8000.0, 6);
        assert!(t[0] <= 1024.0 && *t.last().unwrap() >= 8000.0, "{t:?}");
        assert!(
            t.windows(2).all(|w| (w[1] - w[0] - 2000.0).abs() < 1e-9),
            "{t:?}"
        );
        // A flat range still gets an axis.
        assert!(nice_ticks(3.0, 3.0, 5).len() >= 2);
        assert!(nice_ticks(f64::NAN, 1.0, 5).is_empty());
    }

    #[test]
    fn one_polyline_per_series_inside_the_panel() {
        let chart = Chart {
            title: "t <1>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![
                Series {
                    label: "a".into(),
                    points: vec![(0.0, 1.0), (10.0, 3.0), (f64::NAN, 2.0)],
                },
                Series {
                    label: "b".into(),
                    points: vec![(5.0, 2.0), (10.0, 0.5)],
                },
            ],
        };
        let doc = svg(&[chart.clone(), chart]);
        let lines = series_polylines(&doc);
        assert_eq!(lines.len(), 4, "{doc}");
        assert!(doc.contains("t &lt;1&gt;"), "the title, escaped");
        for label in ["a", "b"] {
            assert_eq!(doc.matches(&text(label)).count(), 2, "legend {label}");
        }
        // Every plotted coordinate lies inside its panel's plot area (series come panel by
        // panel), and the NaN point is skipped: 2 + 2 points per panel.
        let mut points = 0;
        for (i, polyline) in lines.iter().enumerate() {
            let left = (i / 2) as f64 * PANEL_W as f64;
            let pts = polyline.split("points=\"").nth(1).unwrap();
            for p in pts[..pts.find('"').unwrap()].split_whitespace() {
                let (x, y) = p.split_once(',').unwrap();
                let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
                let xs = left + MARGIN_L as f64..=left + (PANEL_W - MARGIN_R) as f64;
                assert!(xs.contains(&x), "polyline {i}: x {x} outside {xs:?}");
                let ys = MARGIN_T as f64..=(PANEL_H - MARGIN_B) as f64;
                assert!(ys.contains(&y), "polyline {i}: y {y} outside {ys:?}");
                points += 1;
            }
        }
        assert_eq!(points, 2 * (2 + 2));
    }

    /// The `<polyline>` elements drawn in a series colour (the axes and ticks are polylines too).
    fn series_polylines(doc: &str) -> Vec<&str> {
        let colors: Vec<String> = COLORS
            .iter()
            .map(|c| format!("stroke=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2))
            .collect();
        doc.lines()
            .filter(|l| l.starts_with("<polyline") && colors.iter().any(|c| l.contains(c)))
            .collect()
    }

    /// A `<text>` element's body as the SVG backend writes it (on its own line).
    fn text(s: &str) -> String {
        format!(">\n{s}\n</text>")
    }

    #[test]
    fn a_one_point_series_gets_a_marker_and_axis_labels_are_short() {
        let doc = svg(&[Chart {
            title: "bytes".into(),
            x_label: "context".into(),
            y_label: "KV bytes".into(),
            series: vec![Series {
                label: "single".into(),
                points: vec![(4096.0, 188_743_680.0)],
            }],
        }]);
        assert_eq!(doc.matches("<circle").count(), 1, "{doc}");
        for t in ["bytes", "context", "KV bytes", "single", "0", "200M"] {
            assert!(doc.contains(&text(t)), "no text {t:?} in {doc}");
        }
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(label(10.0), "10");
        assert_eq!(label(2.5), "2.5");
        assert_eq!(label(8000.0), "8000");
        assert_eq!(label(20_000.0), "20k");
        assert_eq!(label(188_743_680.0), "188.74M");
        assert_eq!(label(2e9), "2G");
    }

    #[test]
    fn empty_charts_do_not_panic() {
        let doc = svg(&[Chart {
            title: "empty".into(),
            x_label: String::new(),
            y_label: String::new(),
            series: vec![Series {
                label: "none".into(),
                points: vec![],
            }],
        }]);
        assert!(doc.contains(&text("no data")), "{doc}");
        assert!(series_polylines(&doc).is_empty());
    }
}
