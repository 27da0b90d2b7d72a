#!/usr/bin/env bash
# Sets everything up and runs the main job into out/ (7 minutes on 2 cores after setup, measured):
#  1. the six paper configurations compiled and summarised: Table 2's parameter counts, D's 15.47 GMACs;
#  2. the network picture of D, standard and dense;
#  3. the paper's method where scale matters: real handwriting at 20 to 64 px in cluttered scenes, the
#     paper's D eight times narrower trained with scale jittering, evaluated dense, multi-crop and
#     combined through onnxruntime, and heat maps of where its score map finds the digit;
#  4. the scenes model served by `vggspec serve` on 127.0.0.1, asked once with Triton's own client and once
#     on the image endpoint, then stopped with SIGTERM;
#  5. D compiled to a PyTorch module and exported to ONNX, standard and fully convolutional.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VGGSPEC="$PWD/.venv/bin/vggspec"
V=$VGGSPEC
mkdir -p out

echo "== 1. the paper's configurations (Table 2)"
for c in A A-LRN B C D E; do
    $V summary "$c" --json > "out/summary-$c.json"
    .venv/bin/python -c "import json,sys; d=json.load(open(sys.argv[1])); print(f\"{sys.argv[2]:6s} {d['params']:>13,} parameters {d['macs']/1e9:7.2f} GMACs\")" "out/summary-$c.json" "$c"
done
$V summary D

echo "== 2. pictures"
$V graph D -o out/D.png
$V graph D -o out/D.svg
$V graph D --fully-conv -o out/D-dense.png

echo "== 3. the paper in miniature: scale-jittered narrow D on cluttered handwriting, end to end"
bash examples/scenes_pipeline.sh out/scenes

echo "== 4. the scenes model served: Open Inference Protocol (Triton's client) and the image endpoint"
VGGSPEC=$V bash examples/serve_demo.sh out/scenes/run/d_dense.onnx

echo "== 5. D compiled and exported"
$V build D --target torch -o out/vgg_d.py
$V export D -o out/D.onnx
$V export D --fully-conv --flip -o out/D-dense.onnx
echo "demo finished: see out/"
