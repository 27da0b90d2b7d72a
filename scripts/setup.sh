#!/usr/bin/env bash
# Creates .venv (once) and installs vggspec with everything the demo and the tests need.
# torch and torchvision are pinned to the releases that lie on this project's machines' disks;
# vggspec itself accepts any torch >= 2.1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

pip_install() {  # quiet unless it fails; pip's notes about missing local indexes are noise
    local log
    log=$(mktemp)
    if ! .venv/bin/python -m pip install -q "$@" >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" >&2 || true
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    echo "installing torch and torchvision (a few minutes the first time)"
    pip_install "torch==2.14.1" "torchvision==0.29.1"
fi
pip_install -e ".[cpu,train,dev,serve,grpc]"
.venv/bin/python -c "import vggspec, torch, onnxruntime; print('vggspec', vggspec.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
