#!/usr/bin/env bash
# One call on the GPU machine: bring one part of onnxruntime-gpu, then run the given phases of gpu_run.py.
#
#   bash benchmarks/gpu_device.sh PART|- PHASE...
#
# onnxruntime-gpu (one cp312 manylinux wheel, ~256 MB; its package folder, xz-compressed, ~203 MB) cannot
# travel in one call (64 MiB each), so it comes in parts, one per call, made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl onnxruntime-gpu==1.31.1
#   mkdir site && (cd site && unzip -q ../.whl/onnxruntime_gpu-*.whl && rm onnxruntime/capi/*tensorrt*)
#   tar -cf - -C site . | xz -9 -T2 > ort.tar.xz && split -n 4 -d ort.tar.xz .whl/parts/ort.tar.xz.part
# Each call copies its part to /tmp/ort-parts (the machine keeps /tmp between calls while it is warm);
# once all four are there they are joined and unpacked into /tmp/ort-gpu, which then comes first on
# PYTHONPATH, ahead of the machine's CPU-only onnxruntime (the two packages overwrite each other's files).
set -uo pipefail
part=$1; shift
mkdir -p /tmp/ort-parts
if [ "$part" != "-" ]; then cp "$part" /tmp/ort-parts/; fi
n=$(ls /tmp/ort-parts | wc -l)
if [ "$n" -ge 4 ] && [ ! -d /tmp/ort-gpu/onnxruntime ]; then
    mkdir -p /tmp/ort-gpu
    cat /tmp/ort-parts/ort.tar.xz.part0[0-3] | python3 -c "import lzma, sys, tarfile
tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode='r|').extractall('/tmp/ort-gpu', filter='data')" \
        || { echo "unpacking onnxruntime-gpu failed"; rm -rf /tmp/ort-gpu; }
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -d /tmp/ort-gpu/onnxruntime ]; then export PYTHONPATH=/tmp/ort-gpu:$PYTHONPATH; fi
echo "parts here: $n; onnxruntime: $(python3 -c 'import onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())' 2>&1 | tail -1)"
out=${OUT:-gpu-out}; mkdir -p "$out"
python3 benchmarks/gpu_run.py "$@" --out "$out" 2>&1 | tee "$out/log-$(date +%H%M%S).txt"
