#!/usr/bin/env bash
# Redraws every figure in docs/figures/ from the JSON in docs/data/ that `eval --json` or
# `bench --json` wrote, with the binary's own `report` subcommand (`report FILE.json --plot
# FILE.svg`: the same charts `eval --plot` and `bench --plot` draw). No model, no measurement:
# a few seconds. `make figures` builds the binary first, then runs this.
#
#   scripts/figures.sh           rewrite docs/figures/*.svg
#   scripts/figures.sh --check   draw into a temporary folder and compare with the committed
#                                files byte for byte; exit 1 if any differs or is missing
#
# MISTRALRS_LOGQUANT_BIN names another binary (default target/release/mistralrs-logquant).
#
# Every committed figure is listed here, each with its data file; a new figure is one more
# line. (All eleven redraw byte-identical from their committed JSON; none is drawn from data that
# is not in docs/data/.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN=${MISTRALRS_LOGQUANT_BIN:-target/release/mistralrs-logquant}

# figure (docs/figures/NAME.svg)   data (docs/data/NAME.json)   page that shows it
FIGURES=(
    bench-b1-q8       # speed.md: decode speed under the default weights, batch 1; README
    bench-b8-q8       # speed.md: the same, batch 8
    bench-b1          # speed.md: decode speed with f32 weights, batch 1
    bench-b8          # speed.md: the same, batch 8
    bench-policies    # speed.md: the other policies, and run-to-run noise
    copy-q8_0-1k-3k   # quality.md: the copy task at 1k and 3k filler, default weights
    copy-pareto-3k    # quality.md: the Pareto chart, copy at 3000 filler
    eval-pareto-1k    # quality.md: the Pareto chart, perplexity at 1k
    copy-6k           # quality.md: at 6000 filler
    eval-8k           # quality.md: quality from 1k to 8k tokens
    gemma3-ppl-8k     # quality.md: Gemma 3 270M at 8k
    gemma3-ppl-32k    # quality.md: Gemma 3 270M at 32k
)

check=false
case "${1:-}" in
    --check) check=true ;;
    "") ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

if [[ ! -x $BIN ]]; then
    echo "error: $BIN not found; run \`make build\` (or set MISTRALRS_LOGQUANT_BIN)" >&2
    exit 1
fi

out=docs/figures
if $check; then
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
fi

failed=0
for name in "${FIGURES[@]}"; do
    data=docs/data/$name.json
    if [[ ! -f $data ]]; then
        echo "missing data: $data" >&2
        failed=1
        continue
    fi
    # `report` also prints the run's tables on stdout; only the SVG is wanted here.
    "$BIN" report "$data" --plot "$out/$name.svg" >/dev/null
    if $check; then
        if cmp -s "$out/$name.svg" "docs/figures/$name.svg"; then
            echo "same      docs/figures/$name.svg"
        else
            echo "DIFFERS   docs/figures/$name.svg (from $data)"
            failed=1
        fi
    else
        echo "wrote     docs/figures/$name.svg (from $data)"
    fi
done
exit $failed
