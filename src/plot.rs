//! Line charts as standalone SVG: what `bench --plot` and `eval --plot` write. Small on
//! purpose (axes, "nice" ticks, one polyline per series, a legend), so it needs no font or
//! rendering library and the output is plain text that diffs and opens in any browser.

use std::fmt::Write;

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

const PANEL_W: f64 = 560.0;
const PANEL_H: f64 = 380.0;
const MARGIN_L: f64 = 78.0;
const MARGIN_R: f64 = 18.0;
const MARGIN_T: f64 = 34.0;
const MARGIN_B: f64 = 50.0;
const LEGEND_LINE: f64 = 16.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

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

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The charts side by side in one SVG document.
pub fn svg(charts: &[Chart]) -> String {
    let legend_rows = charts.iter().map(|c| c.series.len()).max().unwrap_or(0);
    let width = PANEL_W * charts.len().max(1) as f64;
    let height = PANEL_H + LEGEND_LINE * legend_rows as f64 + 10.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    for (i, chart) in charts.iter().enumerate() {
        panel(&mut out, chart, PANEL_W * i as f64);
    }
    out.push_str("</svg>\n");
    out
}

fn panel(out: &mut String, chart: &Chart, left: f64) {
    let points = || {
        chart
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (px0, px1) = (left + MARGIN_L, left + PANEL_W - MARGIN_R);
    let (py0, py1) = (PANEL_H - MARGIN_B, MARGIN_T);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        (px0 + px1) / 2.0,
        escape(&chart.title)
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (px0 + px1) / 2.0,
        PANEL_H - 12.0,
        escape(&chart.x_label)
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        left + 16.0,
        (py0 + py1) / 2.0,
        escape(&chart.y_label)
    );
    if points().next().is_none() {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">no data</text>"#,
            (px0 + px1) / 2.0,
            (py0 + py1) / 2.0
        );
        return;
    }
    let xt = nice_ticks(x0, x1, 6);
    let yt = nice_ticks(y0.min(0.0), y1, 6);
    let (xa, xb) = (xt[0], *xt.last().unwrap_or(&x1));
    let (ya, yb) = (yt[0], *yt.last().unwrap_or(&y1));
    let sx = |x: f64| px0 + (x - xa) / (xb - xa).max(f64::MIN_POSITIVE) * (px1 - px0);
    let sy = |y: f64| py0 + (y - ya) / (yb - ya).max(f64::MIN_POSITIVE) * (py1 - py0);
    for &t in &xt {
        let x = sx(t);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{py0}" x2="{x:.1}" y2="{py1}" stroke="#e6e6e6"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            py0 + 16.0,
            label(t)
        );
    }
    for &t in &yt {
        let y = sy(t);
        let _ = writeln!(
            out,
            r##"<line x1="{px0}" y1="{y:.1}" x2="{px1}" y2="{y:.1}" stroke="#e6e6e6"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            px0 - 6.0,
            y + 4.0,
            label(t)
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{px0}" y="{py1}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        px1 - px0,
        py0 - py1
    );
    for (i, series) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let coords: Vec<String> = series
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if coords.len() == 1 {
            let _ = writeln!(
                out,
                r#"<circle cx="{}" cy="{}" r="3" fill="{color}"/>"#,
                coords[0].split(',').next().unwrap_or("0"),
                coords[0].split(',').nth(1).unwrap_or("0")
            );
        } else if !coords.is_empty() {
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>"#,
                coords.join(" ")
            );
        }
        let ly = PANEL_H + LEGEND_LINE * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            px0,
            px0 + 24.0,
            px0 + 30.0,
            ly + 4.0,
            escape(&series.label)
        );
    }
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
        assert_eq!(doc.matches("<polyline").count(), 4);
        assert!(doc.contains("t &lt;1&gt;"));
        // Every plotted coordinate lies inside its panel.
        for line in doc.lines().filter(|l| l.starts_with("<polyline")) {
            let pts = line
                .split("points=\"")
                .nth(1)
                .unwrap()
                .trim_end_matches("\"/>");
            for p in pts.split(' ') {
                let (x, y) = p.split_once(',').unwrap();
                let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
                assert!((0.0..=2.0 * PANEL_W).contains(&x), "{x}");
                assert!((MARGIN_T..=PANEL_H - MARGIN_B).contains(&y), "{y}");
            }
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
        assert!(doc.contains("no data"));
    }
}
