#!/usr/bin/env bash
# `vggspec serve` on the scenes model: start it on a free 127.0.0.1 port, ask it once with Triton's own
# Python client (Open Inference Protocol, binary tensors; over HTTP, and over gRPC when the grpc extra is
# installed) and once on the image endpoint (the image's bytes, top-k with labels and the heat map), print
# what came back, and stop it with SIGTERM (it drains, exits 0).
#
#   examples/serve_demo.sh [MODEL] [IMAGE]
#       default MODEL: out/scenes/run/d_dense.onnx (examples/scenes_pipeline.sh out/scenes makes it)
#       default IMAGE: the first test scene of out/scenes/data
set -euo pipefail

MODEL=${1:-out/scenes/run/d_dense.onnx}
IMAGE=${2:-}
VGGSPEC=${VGGSPEC:-vggspec}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if [ -z "$IMAGE" ]; then
    IMAGE=$("$PY" -c 'import json, sys; m = json.load(open(sys.argv[1] + "/scenes.json"))
print(sys.argv[1] + "/" + m["splits"]["test"]["images"][0]["file"])' out/scenes/data)
fi

GRPC=()
"$PY" -c 'import grpc' 2>/dev/null && GRPC=(--grpc-port 0)
LOG=$(mktemp)
$VGGSPEC serve "scenes=$MODEL" --port 0 "${GRPC[@]}" 2>"$LOG" &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; rm -f "$LOG"' EXIT

PORT=""
for _ in $(seq 1 300); do  # up to 60 s: loading a model takes a moment
    PORT=$(sed -n 's|.*on http://127\.0\.0\.1:\([0-9]*\).*|\1|p' "$LOG" | head -n 1)
    [ -n "$PORT" ] && break
    kill -0 "$PID" 2>/dev/null || { cat "$LOG" >&2; exit 1; }
    sleep 0.2
done
[ -n "$PORT" ] || { echo "the server did not start" >&2; cat "$LOG" >&2; exit 1; }
GRPC_PORT=$(sed -n 's|.*gRPC on 127\.0\.0\.1:\([0-9]*\).*|\1|p' "$LOG" | head -n 1)
echo "server: http://127.0.0.1:$PORT${GRPC_PORT:+, gRPC 127.0.0.1:$GRPC_PORT} (pid $PID)"

"$PY" - "$PORT" "$MODEL" "$IMAGE" "$GRPC_PORT" <<'PY'
import base64, json, sys, urllib.request

import numpy as np
import tritonclient.http as httpclient

from vggspec.runtime import load, preprocess

port, model_path, image, grpc_port = sys.argv[1:5]
url = f"127.0.0.1:{port}"

# 1. Triton's client, unmodified: the model's own input (fp32 N x C x H x W), preprocessed as vggspec does.
client = httpclient.InferenceServerClient(url)
meta = client.get_model_metadata("scenes")
print("metadata:", json.dumps({k: meta[k] for k in ("name", "inputs", "outputs")}))
info = load(model_path, device="cpu").info
x = preprocess(image, info, min(info.input_size))
inp = httpclient.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
inp.set_data_from_numpy(x.astype(np.float32), binary_data=True)
probs = client.infer("scenes", [inp], outputs=[httpclient.InferRequestedOutput("probs")]).as_numpy("probs")[0]
best = int(np.argmax(probs))
print(f"tritonclient: {image} -> {info.label(best)} (p={probs[best]:.3f})")
client.close()

if grpc_port:  # the same request over gRPC: the same posteriors
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.astype(np.float32))
    over_grpc = client.infer("scenes", [inp]).as_numpy("probs")[0]
    print(f"tritonclient.grpc: {info.label(int(np.argmax(over_grpc)))} (p={over_grpc.max():.3f}), "
          f"largest difference from HTTP {np.abs(over_grpc - probs).max():.1e}")
    client.close()

# 2. The image endpoint: the file's bytes, the model's own protocol and scales, the heat map at Q = 192.
with open(image, "rb") as f:
    body = f.read()
request = urllib.request.Request(f"http://{url}/v2/models/scenes/classify?topk=3&heatmap=true&scales=192",
                                 data=body, headers={"Content-Type": "application/octet-stream"}, method="POST")
with urllib.request.urlopen(request, timeout=60) as resp:
    result = json.load(resp)
tops = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in result["top"])
print(f"classify: {result['protocol']} at Q={result['scales']}, flip={result['flip']}: {tops}")
heat = result["heatmap"]
if heat:
    print(f"heat map of '{heat['label']}': a {heat['width']} x {heat['height']} PNG, "
          f"{len(base64.b64decode(heat['png']))} bytes")
PY

kill -TERM "$PID"
status=0
wait "$PID" || status=$?
trap - EXIT
rm -f "$LOG"
echo "server stopped (exit $status)"
exit "$status"
