#!/usr/bin/env bash
# Sets everything up and runs the main job into out/:
# the six paper configurations summarised (Table 2's counts), and the picture of D.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
V=.venv/bin/vggspec
for c in A A-LRN B C D E; do
    $V summary "$c" --json > "out/summary-$c.json"
    .venv/bin/python -c "import json,sys; d=json.load(open(sys.argv[1])); print(f\"{sys.argv[2]:6s} {d['params']:>13,} parameters {d['macs']/1e9:7.2f} GMACs\")" "out/summary-$c.json" "$c"
done
$V summary D
$V graph D -o out/D.png
$V graph D -o out/D.svg
$V graph D --fully-conv -o out/D-dense.png
echo "demo finished: see out/"
