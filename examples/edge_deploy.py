"""Deploying a vggspec model on an edge box: onnxruntime, numpy and Pillow only (no torch).

On the workstation, compile and export (the dense form takes any image size; --flip averages the mirror
image inside the graph; --scores adds the class score map for heatmaps):

    vggspec export D --weights vgg16.safetensors --fully-conv --flip -o vgg16_dense.onnx
    vggspec export D --weights vgg16.safetensors -o vgg16.onnx

On the edge box (`pip install vggspec[cpu]`, or `vggspec[gpu]` for onnxruntime-gpu), the command-line way:

    vggspec predict vgg16_dense.onnx cat.jpg --scales 256,384,512 --top 5
    vggspec predict vgg16_dense.onnx cat.jpg --protocol combined --crop-model vgg16.onnx --json
    vggspec eval vgg16_dense.onnx --data val/ --protocol dense --protocol combined --crop-model vgg16.onnx
    vggspec fuse vgg16_dense.onnx vgg19_dense.onnx -o ensemble.onnx      # ConvNet fusion, one graph

The Python way is below: `with_vggspec_runtime` uses vggspec.runtime (the same code as the commands);
`with_onnxruntime_only` shows everything it does for the dense protocol at one scale, in plain
onnxruntime + numpy + Pillow, reading the preprocessing from the model's metadata.

    python examples/edge_deploy.py vgg16_dense.onnx cat.jpg [Q]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def with_vggspec_runtime(model_path: str, image_path: str, q: int | None = None) -> list[tuple[str, float]]:
    from vggspec.runtime import load, predict

    model = load(model_path, device="auto")  # TensorRT, then CUDA, then CPU: whichever initialises
    print(f"running on {model.provider}")
    return [(label, p) for _, label, p in predict(model, image_path, scales=[q] if q else None, top=5)]


def with_onnxruntime_only(model_path: str, image_path: str, q: int | None = None) -> list[tuple[str, float]]:
    wanted = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    session = ort.InferenceSession(model_path, providers=[p for p in wanted if p in ort.get_available_providers()])
    meta = session.get_modelmeta().custom_metadata_map
    prep, (h, w) = json.loads(meta["vggspec.preprocessing"]), json.loads(meta["vggspec.input_size"])
    labels = json.loads(meta.get("vggspec.labels", "[]"))
    gray = session.get_inputs()[0].shape[1] == 1  # NCHW: a one-channel network reads grayscale
    img = ImageOps.exif_transpose(Image.open(image_path)).convert("L" if gray else "RGB")
    q = q or min(h, w)  # the test scale: smallest side after an isotropic rescale
    img = img.resize((round(img.width * q / min(img.size)), round(img.height * q / min(img.size))), Image.BILINEAR)
    x = np.asarray(img, np.float32).reshape(img.height, img.width, -1)  # H x W x C, also for grayscale
    if prep["channel_order"] == "BGR":
        x = x[..., ::-1]  # mean and std are listed in the model's channel order
    x = (x * prep["scale"] - np.float32(prep["mean"])) / np.float32(prep["std"])
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None], np.float32)
    if meta.get("vggspec.flip") != "true":  # the graph does not flip itself: average with the mirror here
        x = np.concatenate([x, x[..., ::-1]])
    probs = session.run(["probs"], {"input": x})[0].mean(axis=0)
    top = np.argsort(-probs)[:5]
    return [(labels[i] if i < len(labels) else str(i), float(probs[i])) for i in top]


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        print("usage: python examples/edge_deploy.py MODEL.onnx IMAGE [Q]", file=sys.stderr)
        sys.exit(2)
    model, image = sys.argv[1], sys.argv[2]
    scale = int(sys.argv[3]) if len(sys.argv) > 3 else None
    for name, fn in (("vggspec.runtime", with_vggspec_runtime), ("onnxruntime only", with_onnxruntime_only)):
        print(name)
        for label, p in fn(model, image, scale):
            print(f"  {label:<24} {p:.4f}")
