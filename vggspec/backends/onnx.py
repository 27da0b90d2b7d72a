"""The ONNX backend: LayerGraph + numpy weights -> onnx.ModelProto, built with onnx.helper (no torch).

Graph layout (tensor and node names follow the layer graph, so Netron shows the paper's layers):

    input  [or image -> Cast, Mul, Sub, Div, Transpose (embedded preprocessing)]
      [flip: Concat(x, Slice(x, W axis, step -1)) on the batch axis: one pass over both]
      [fp16: Cast to float16]
      conv1_1 (bn1_1) relu1_1 ... pool5 flatten fc6 relu6 fc7 relu7 fc8   (dropout omitted)
      [fp16: Cast back to float32: the mean and the soft-max always run in float32]
      [dense: mean = GlobalAveragePool + Flatten over the score map]
      prob (Softmax) [flip: Split the batch in two, average the posteriors] -> probs
      [scores: the class score map (N, classes, h, w); 1 x 1 for the standard graph]

Choices:
- Opset 17 and IR version 8 by default. onnxruntime has run IR 8 / opset 17 since 1.14
  (early 2023), as do TensorRT 8.6, OpenVINO 2023 and the ONNX runtimes shipped on most edge boxes;
  a newer opset buys this graph nothing (opset 18 only moves ReduceMean's and Split's
  arguments around). `opset` may be 13 (per-channel QDQ needs it) up to what onnx knows; the IR
  version is the smallest one that opset requires, never below 8.
- Batch norm is emitted as BatchNormalization with the checkpoint's names (bn1_1.weight,
  bn1_1.running_mean, ...) so the file maps one to one onto the state_dict; onnxruntime folds it into
  the convolution when it loads the model. For int8 it is folded here, before quantization,
  so that per-channel scales are computed on the kernels actually used.
- fp16 is our own cast insertion (no onnxconverter-common): float16 initializers and body,
  float32 input, score mean, soft-max and outputs, since averaging a large score map and a
  soft-max over 1000 classes are where half precision loses the most.
- Models whose weights pass 2 GB (protobuf's limit) are saved with external data, OUT.data beside
  OUT; the returned ModelProto then refers to that file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..atomic import check_output_path
from ..contract import EXTERNAL_DATA_BYTES, Metadata, to_props
from ..errors import ModelError, VggspecError
from ..graph import Layer, LayerGraph, Preprocessing, kernel_hw
from ..graph import fully_conv as dense_form
from ..imaging import MAX_SCALE, scale_problem
from ..spec.compiled import compiled_text
from ..weights import check_tensors, init_weights, to_dense
from .onnx_stream import check_graph, check_model, save_model, with_weight_inputs, write_atomic

DEFAULT_OPSET = 17
MIN_OPSET = 13  # Softmax over one axis, Unsqueeze/Split with tensor inputs, per-channel QDQ
MIN_IR_VERSION = 8
PRECISIONS = ("fp32", "fp16", "int8")
INT64_MIN = np.iinfo(np.int64).min


@dataclass
class _Builder:
    """Collects nodes and initializers; `body` is the element type of the network's weights."""

    body: int = TensorProto.FLOAT
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    opset: int = DEFAULT_OPSET
    arrays: dict[str, np.ndarray] | None = None  # when given, initializers are kept here, not in the proto

    def init(self, name: str, array: np.ndarray) -> str:
        array = np.require(array, requirements="C")  # not ascontiguousarray: it turns 0-d into 1-d
        if self.arrays is not None:
            self.arrays[name] = array
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        dtype = np.float16 if self.body == TensorProto.FLOAT16 else np.float32
        return self.init(name, np.asarray(array, dtype))

    def node(self, op: str, inputs: Sequence[str], name: str, output: str | None = None, **attrs: object) -> str:
        out = output or name
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out


@dataclass(frozen=True)
class ExportOptions:
    """What to export besides the graph and its weights; the command line builds one from its flags.

    fully_conv: the dense-evaluation form (FC layers as convolutions, any H x W; section 3.2).
    flip: the graph also runs the mirror image and averages the two posteriors.
    scores: a second output, the class score map (N, classes, h, w), for heat maps.
    precision: fp32, fp16 (float16 weights and body), or int8 (static QDQ, needs `calibration` images).
    embed_preprocessing: the input is uint8 NHWC pixels; scaling and normalising happen in the graph.
    opset: ONNX opset, 13 up to what onnx knows. labels, preprocessing: the metadata's (default: the
    graph's). seed: of the initialisation used when no weights are given.
    static_shape: (N, H, W) fixes every input and output dimension (edge compilers, tract, TensorRT);
    H x W is the crop size for a standard model, at least that for a dense one.
    test_scales, test_flip: the model's default test scales Q and flip (metadata vggspec.test_scales and
    vggspec.test_flip; None: not written, runtimes use the input side and flip). training: how the weights
    were trained, {"scale": (Smin, Smax), "flip": bool} (vggspec.training; None: unknown).
    """

    fully_conv: bool = False
    flip: bool = False
    scores: bool = False
    precision: str = "fp32"
    calibration: str | Path | None = None
    embed_preprocessing: bool = False
    opset: int = DEFAULT_OPSET
    labels: Sequence[str] | None = None
    preprocessing: Preprocessing | None = None
    seed: int = 0
    static_shape: tuple[int, int, int] | None = None
    test_scales: Sequence[int] | None = None
    test_flip: bool | None = None
    training: Mapping[str, Any] | None = None


def export_onnx(graph: LayerGraph, output: str | Path | None = None, *, weights: dict[str, np.ndarray] | None = None,
                options: ExportOptions | None = None, **fields: Any) -> onnx.ModelProto:
    """Build the ONNX model of `graph`, check it (full_check) and, when `output` is given, write it atomically.

    `weights` are state_dict-keyed numpy arrays of the standard graph (default: the spec's
    initialisation, seeded). The options come as an ExportOptions, or as its fields by keyword
    (`export_onnx(g, "d.onnx", fully_conv=True)`). Raises VggspecError (or WeightsError) before
    writing anything on bad input.
    """
    o = replace(options or ExportOptions(), **fields)
    _check_options(o.precision, o.calibration, o.opset, output)
    labels = tuple(graph.meta.labels if o.labels is None else o.labels)
    if labels and len(labels) != graph.meta.classes:
        raise VggspecError(f"{len(labels)} labels for {graph.meta.classes} classes", hint="give one label per class")
    if weights is None:
        weights = init_weights(graph, seed=o.seed)
    else:
        check_tensors(graph, weights)
    if o.fully_conv and not graph.meta.fully_conv:
        dense = dense_form(graph)
        graph, weights = dense, to_dense(dense, weights)
    _check_static(graph, o.static_shape)
    opts = _Options(graph.meta.fully_conv, o.flip, o.scores, o.embed_preprocessing, o.precision, o.opset,
                    o.preprocessing or graph.meta.preprocessing, o.static_shape, _test_scales(graph, o.test_scales),
                    o.test_flip, tuple((o.training or {}).items()))
    if opts.preprocessing.problem(graph.meta.input_shape[0]):  # a model no client could feed
        raise VggspecError(f"the preprocessing {opts.preprocessing.problem(graph.meta.input_shape[0])} "
                           f"(it has mean {list(opts.preprocessing.mean)}, std {list(opts.preprocessing.std)})",
                           hint="give the checkpoint the preprocessing of the network's input")
    if o.precision != "int8":
        return _export_float(graph, weights, opts, labels, output)
    model = _quantized(graph, weights, opts, labels, o.calibration)
    if output is not None:
        save_model(model, output)
    else:
        check_model(model)
    return model


def _export_float(graph: LayerGraph, weights: dict[str, np.ndarray], opts: _Options, labels: Sequence[str],
                  output: str | Path | None) -> onnx.ModelProto:
    """Build the graph apart from its weights, check it, then attach the weights or stream them to `output`.

    With `output`, the returned ModelProto is the skeleton: graph and metadata, no initializers (they
    are in the file). The weights never sit in protobuf: for D that saves three copies of 553 MB.
    """
    arrays: dict[str, np.ndarray] = {}
    skeleton = build_model(graph, weights, opts, labels, arrays)
    check_graph(skeleton, arrays)
    large = sum(a.nbytes for a in arrays.values()) >= EXTERNAL_DATA_BYTES
    if output is not None and not large:
        write_atomic(skeleton, arrays, output)
        return skeleton
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    model.graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in arrays.items())
    if output is not None:
        save_model(model, output)
    return model


def _quantized(graph: LayerGraph, weights: dict[str, np.ndarray], opts: _Options, labels: Sequence[str],
               calibration: str | Path | None) -> onnx.ModelProto:
    from .onnx_quant import Feed, quantize

    model = build_model(graph, fold_batch_norm(graph, weights), opts, labels)
    c, h, w = graph.meta.input_shape
    n, h, w = opts.static or (1, h, w)  # a static model is calibrated at the one shape it takes
    model = quantize(model, calibration, Feed(c, (h, w), opts.preprocessing, opts.embed, n))
    _set_metadata(model, graph, opts, labels)  # quantize_static rewrites the model's header
    return model


@dataclass(frozen=True)
class _Options:
    dense: bool
    flip: bool
    scores: bool
    embed: bool
    precision: str
    opset: int
    preprocessing: Preprocessing
    static: tuple[int, int, int] | None = None
    test_scales: tuple[int, ...] = ()
    test_flip: bool | None = None
    training: tuple[tuple[str, Any], ...] = ()


def _test_scales(graph: LayerGraph, scales: Sequence[int] | None) -> tuple[int, ...]:
    """The default test scales, each a Q the model can be tested at: at least the input's shorter side."""
    if not scales:
        return ()
    smallest = min(graph.meta.input_shape[1:])
    for q in scales:
        if not isinstance(q, int) or q < smallest:
            raise VggspecError(f"test scale {q} is smaller than the input's shorter side {smallest}",
                               hint=f"give test scales of at least {smallest} (Q is the image's shorter side)")
        if scale_problem(q):
            raise VggspecError(f"test scale {q} {scale_problem(q)}", hint=f"give test scales of at most {MAX_SCALE}")
    return tuple(sorted(set(scales)))


def _check_options(precision: str, calibration: str | Path | None, opset: int, output: str | Path | None) -> None:
    if precision not in PRECISIONS:
        raise VggspecError(f"unknown precision {precision!r}", hint=f"use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and calibration is None:
        raise VggspecError("int8 needs calibration images", hint="give --calibration DIR, a folder of images")
    if precision != "int8" and calibration is not None:
        raise VggspecError("calibration images are only used by int8",
                           hint="add --precision int8, or drop --calibration")
    if precision == "int8":
        from .onnx_quant import calibration_images

        calibration_images(calibration)  # fails early, before the graph is built
    top = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        hint = f"use an opset from {MIN_OPSET} to {top} (default {DEFAULT_OPSET})"
        raise VggspecError(f"opset {opset} is not supported", hint=hint)
    if output is not None:
        check_output_path(output)


def _check_static(graph: LayerGraph, static: tuple[int, int, int] | None) -> None:
    if static is None:
        return
    n, h, w = static
    size = graph.meta.input_shape[1:]
    if n < 1 or (not graph.meta.fully_conv and (h, w) != size) or h < size[0] or w < size[1]:
        need = "exactly" if not graph.meta.fully_conv else "at least"
        hint = ("a standard model's input is its crop size; export --fully-conv for larger images"
                if not graph.meta.fully_conv else "a dense model takes images at least as large as its crop")
        raise VggspecError(f"static shape {n}x{h}x{w}: the batch must be positive and H x W {need} "
                           f"{size[0]}x{size[1]}", hint=hint)


def fold_batch_norm(graph: LayerGraph, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weights with every conv + bn pair folded into the conv; the bn tensors are dropped, so the bn emits nothing."""
    out = dict(weights)
    layers = graph.layers
    for conv, bn in zip(layers, layers[1:], strict=False):
        if conv.op != "conv" or bn.op != "bn":
            continue
        gamma, beta, mean, var = (np.asarray(weights[f"{bn.name}.{k}"], np.float64)
                                  for k in ("weight", "bias", "running_mean", "running_var"))
        factor = gamma / np.sqrt(var + bn.attrs["eps"])
        w = np.asarray(weights[f"{conv.name}.weight"], np.float64)
        b = np.asarray(weights[f"{conv.name}.bias"], np.float64)
        out[f"{conv.name}.weight"] = (w * factor[:, None, None, None]).astype(np.float32)
        out[f"{conv.name}.bias"] = ((b - mean) * factor + beta).astype(np.float32)
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            out.pop(f"{bn.name}.{key}", None)
    return out


def build_model(
    graph: LayerGraph, weights: dict[str, np.ndarray], opts: _Options, labels: Sequence[str],
    arrays: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """The unchecked ModelProto of a (standard or dense) graph with matching weights.

    With `arrays`, the initializers go into that dict (name -> array, in graph order) instead of the
    proto, for writers that stream them.
    """
    body = TensorProto.FLOAT16 if opts.precision == "fp16" else TensorProto.FLOAT
    b = _Builder(body, opset=opts.opset, arrays=arrays)
    graph_input, x = _input_stage(b, graph, opts)
    if opts.flip:
        x = b.node("Concat", [x, _reverse(b, x, 3, "flip")], "flip_batch", axis=0)
    if opts.precision == "fp16":
        x = b.node("Cast", [x], "to_fp16", to=TensorProto.FLOAT16)
    x = _body(b, graph, weights, x)
    if opts.precision == "fp16":
        x = b.node("Cast", [x], "to_fp32", to=TensorProto.FLOAT)
    outputs = _head(b, graph, opts, x)
    onnx_graph = helper.make_graph(b.nodes, graph.meta.name, [graph_input], outputs, b.inits)
    opset_ids = [helper.make_opsetid("", opts.opset)]
    model = helper.make_model(onnx_graph, opset_imports=opset_ids, producer_name="vggspec")
    model.ir_version = max(MIN_IR_VERSION, helper.find_min_ir_version_for(opset_ids))
    _set_metadata(model, graph, opts, labels)
    if opts.static is not None:
        _fix_dims(model, opts.static, arrays)
    return model


def _fix_dims(model: onnx.ModelProto, static: tuple[int, int, int], arrays: dict[str, np.ndarray] | None) -> None:
    """Every symbolic dimension made fixed: the input's from `static`, the outputs' by onnx's shape inference."""
    n, h, w = static
    for dim in model.graph.input[0].type.tensor_type.shape.dim:
        if dim.dim_param:
            dim.dim_value = {"N": n, "H": h, "W": w}[dim.dim_param]
    probe = with_weight_inputs(model, arrays or {})
    inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True)
    shapes = {o.name: o.type.tensor_type.shape for o in inferred.graph.output}
    for out in model.graph.output:
        out.type.tensor_type.shape.CopyFrom(shapes[out.name])


def _input_stage(b: _Builder, graph: LayerGraph, opts: _Options) -> tuple[onnx.ValueInfoProto, str]:
    """The graph input and the float32 NCHW tensor the network reads."""
    c, h, w = graph.meta.input_shape
    hw: list[int | str] = ["H", "W"] if opts.dense else [h, w]
    if not opts.embed:
        return helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, *hw]), "input"
    p = opts.preprocessing
    x = b.node("Cast", ["image"], "preprocess_cast", to=TensorProto.FLOAT)
    if p.channel_order.upper() == "BGR":  # decoded frames are RGB; the network wants BGR
        x = _reverse(b, x, 3, "preprocess_bgr")
    x = b.node("Mul", [x, b.init("preprocess.scale", np.array(p.scale, np.float32))], "preprocess_scale")
    x = b.node("Sub", [x, b.init("preprocess.mean", _per_channel(p.mean, c))], "preprocess_mean")
    x = b.node("Div", [x, b.init("preprocess.std", _per_channel(p.std, c))], "preprocess_std")
    x = b.node("Transpose", [x], "preprocess_nchw", perm=[0, 3, 1, 2])
    return helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", *hw, c]), x


def _reverse(b: _Builder, x: str, axis: int, name: str) -> str:
    """x reversed along `axis`: Slice from the last element to before the first, step -1."""
    starts, ends = b.init(f"{name}.starts", np.array([-1])), b.init(f"{name}.ends", np.array([INT64_MIN]))
    axes, steps = b.init(f"{name}.axes", np.array([axis])), b.init(f"{name}.steps", np.array([-1]))
    return b.node("Slice", [x, starts, ends, axes, steps], name)


def _per_channel(values: Sequence[float], channels: int) -> np.ndarray:
    v = np.asarray(values, np.float32)
    if v.size == 1:
        v = np.full(channels, v.item(), np.float32)
    if v.size != channels:
        raise VggspecError(f"preprocessing has {v.size} values for {channels} input channels")
    return v


def _emit_conv(b: _Builder, layer: Layer, w: dict[str, np.ndarray], x: str) -> str:
    kh, kw = kernel_hw(layer)
    p, s = layer.attrs["padding"], layer.attrs["stride"]
    return b.node("Conv", _with_params(b, layer, w, x), layer.name, kernel_shape=[kh, kw], pads=[p] * 4, strides=[s, s])


def _emit_bn(b: _Builder, layer: Layer, w: dict[str, np.ndarray], x: str) -> str:
    if f"{layer.name}.running_mean" not in w:  # folded into the conv before it (int8)
        return x
    keys = ("weight", "bias", "running_mean", "running_var")
    inputs = [x, *(b.weight(f"{layer.name}.{k}", w[f"{layer.name}.{k}"]) for k in keys)]
    return b.node("BatchNormalization", inputs, layer.name, epsilon=float(layer.attrs["eps"]))


def _emit_fc(b: _Builder, layer: Layer, w: dict[str, np.ndarray], x: str) -> str:
    return b.node("Gemm", _with_params(b, layer, w, x), layer.name, transB=1)  # weight is (out, in), as torch's


def _with_params(b: _Builder, layer: Layer, w: dict[str, np.ndarray], x: str) -> list[str]:
    return [x, *(b.weight(f"{layer.name}.{k}", w[f"{layer.name}.{k}"]) for k in ("weight", "bias"))]


def _emit_lrn(b: _Builder, layer: Layer, w: dict[str, np.ndarray], x: str) -> str:
    a = layer.attrs
    # the graph's alpha is already in ONNX's convention (divided by size in the formula), k is ONNX's bias
    return b.node("LRN", [x], layer.name, size=int(a["size"]), alpha=float(a["alpha"]), beta=float(a["beta"]),
                  bias=float(a["k"]))


def _emit_pool(b: _Builder, layer: Layer, w: dict[str, np.ndarray], x: str) -> str:
    k, s = layer.attrs["kernel"], layer.attrs["stride"]
    return b.node("MaxPool", [x], layer.name, kernel_shape=[k, k], strides=[s, s])


_EMITTERS: dict[str, Callable[[_Builder, Layer, dict[str, np.ndarray], str], str]] = {
    "conv": _emit_conv,
    "bn": _emit_bn,
    "fc": _emit_fc,
    "lrn": _emit_lrn,
    "maxpool": _emit_pool,
    "relu": lambda b, layer, w, x: b.node("Relu", [x], layer.name),
    "flatten": lambda b, layer, w, x: b.node("Flatten", [x], layer.name, axis=1),
    "dropout": lambda b, layer, w, x: x,  # inference: identity
    "input": lambda b, layer, w, x: x,
}


def _body(b: _Builder, graph: LayerGraph, weights: dict[str, np.ndarray], x: str) -> str:
    """Every layer up to the class scores (the FC logits, or the dense score map)."""
    for layer in graph.layers:
        if layer.op in ("mean", "softmax"):
            break
        if layer.op not in _EMITTERS:
            raise ModelError(f"the ONNX backend has no translation for layer {layer.name} ({layer.op})")
        x = _EMITTERS[layer.op](b, layer, weights, x)
    return x


def _head(b: _Builder, graph: LayerGraph, opts: _Options, x: str) -> list[onnx.ValueInfoProto]:
    """Spatial mean (dense), soft-max, the flip average, and the graph outputs."""
    score_map = x
    if opts.dense:
        x = b.node("GlobalAveragePool", [x], "mean", output="mean_map")
        x = b.node("Flatten", [x], "mean_flatten", output="mean", axis=1)
    k = graph.meta.classes
    if opts.flip:
        x = b.node("Softmax", [x], "prob", axis=1)
        probs, flipped = _split_batch(b, x, "flip_split")
        x = b.node("Add", [probs, flipped], "flip_sum")
        b.node("Mul", [x, b.init("flip.half", np.array(0.5, np.float32))], "flip_mean", output="probs")
    else:
        b.node("Softmax", [x], "prob", output="probs", axis=1)
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", k])]
    if opts.scores:
        outputs.append(_scores_output(b, opts, score_map, k))
    return outputs


def _split_batch(b: _Builder, x: str, name: str) -> tuple[str, str]:
    """The two halves of the doubled (original + flipped) batch."""
    outs = [f"{name}_0", f"{name}_1"]
    attrs = {"axis": 0, **({"num_outputs": 2} if b.opset >= 18 else {})}
    b.nodes.append(helper.make_node("Split", [x], outs, name=name, **attrs))
    return outs[0], outs[1]


def _scores_output(b: _Builder, opts: _Options, score_map: str, classes: int) -> onnx.ValueInfoProto:
    """The class score map of the unflipped image: (N, classes, h, w), 1 x 1 for the standard graph."""
    if opts.flip:
        score_map, _ = _split_batch(b, score_map, "scores_split")
    if opts.dense:
        b.node("Identity", [score_map], "scores_out", output="scores")
        dims: list[int | str] = ["N", classes, "h", "w"]
    else:
        b.node("Unsqueeze", [score_map, b.init("scores.axes", np.array([2, 3]))], "scores_out", output="scores")
        dims = ["N", classes, 1, 1]
    return helper.make_tensor_value_info("scores", TensorProto.FLOAT, dims)


def _set_metadata(model: onnx.ModelProto, graph: LayerGraph, opts: _Options, labels: Sequence[str]) -> None:
    """metadata_props as vggspec.contract says (the runtime reads them), plus the standard fields."""
    from ..version import __version__

    meta = graph.meta
    c, h, w = meta.input_shape
    contract = Metadata(
        name=meta.name, classes=meta.classes, input_size=(h, w), channels=c, preprocessing=opts.preprocessing,
        labels=tuple(labels), fully_conv=opts.dense, flip=opts.flip, embedded_preprocessing=opts.embed,
        scores=opts.scores, precision=opts.precision, spec=compiled_text(meta.spec_text, meta.overrides),
        version=__version__, test_scales=opts.test_scales, test_flip=opts.test_flip, training=opts.training,
    )
    del model.metadata_props[:]
    helper.set_model_props(model, to_props(contract))
    model.producer_name, model.producer_version, model.model_version = "vggspec", __version__, 1
    form = "dense-evaluation (fully convolutional)" if opts.dense else "standard"
    source = Path(meta.spec_path).name if meta.spec_path else "a spec"  # no build-machine path: same bytes anywhere
    model.doc_string = f"{meta.name}: {form} {opts.precision} graph compiled by vggspec {__version__} from {source}"
