"""ConvNet fusion (section 4.4) as one ONNX graph: every member runs on the same input, posteriors averaged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, check_output_path
from ..contract import PROTOBUF_LIMIT, Metadata, from_props, has_metadata, to_props
from ..errors import ModelError
from ..labels import check_same_labels
from .session import check_model_file

# Members must agree on these, or one input cannot feed them all (or the averaged posteriors mean nothing).
MUST_MATCH = ("input_size", "channels", "preprocessing", "fully_conv", "embedded_preprocessing", "flip", "classes")


def _onnx() -> Any:
    import onnx

    return onnx


def _load(path: str | Path) -> Any:
    onnx = _onnx()
    path = check_model_file(path)
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelError(f"not a readable ONNX model ({type(exc).__name__}: {exc})", str(path)) from None


def _props(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _meta(model: Any, path: str) -> Metadata:
    props = _props(model)
    if not has_metadata(props):
        raise ModelError("has no vggspec metadata; fusion needs it to check the members match", path)
    return from_props(props, path, default_name=Path(path).stem)


def check_compatible(paths: Sequence[str], models: Sequence[Any]) -> list[Metadata]:
    """Every member's metadata; a ModelError naming the first member that differs from the first one, and how."""
    metas = [_meta(m, p) for m, p in zip(models, paths, strict=True)]
    for path, model, meta in zip(paths[1:], models[1:], metas[1:], strict=True):
        for key in MUST_MATCH:
            a, b = getattr(metas[0], key), getattr(meta, key)
            if a != b:
                raise ModelError(
                    f"cannot fuse with {paths[0]}: vggspec.{key} differs ({_shown(b)} here, {_shown(a)} there)", path,
                    "members must share input size, preprocessing and form (fully_conv, flip); export them alike",
                )
        _check_io_and_opset(paths[0], models[0], path, model)
    for path, model, meta in zip(paths, models, metas, strict=True):
        _check_width(path, model, meta)
    check_same_labels([(p, m.labels) for p, m in zip(paths, metas, strict=True)])
    return metas


def _shown(value: Any) -> Any:
    return value.to_dict() if hasattr(value, "to_dict") else value


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_io_and_opset(path0: str, m0: Any, path: str, m: Any) -> None:
    i0, i1 = m0.graph.input[0], m.graph.input[0]
    if (i0.name, i0.type.tensor_type.elem_type) != (i1.name, i1.type.tensor_type.elem_type):
        raise ModelError(f"cannot fuse with {path0}: input '{i1.name}' differs from '{i0.name}' in name or type", path)
    if _opset(m0) != _opset(m):
        raise ModelError(f"cannot fuse with {path0}: opset {_opset(m)} here, {_opset(m0)} there", path,
                         "export every member with the same opset")


def _check_width(path: str, model: Any, meta: Metadata) -> None:
    """The member's posteriors must have its metadata's classes: otherwise ONNX Mean would broadcast a width
    of 1, or fail, under members that agree on paper. The graph's declared width, else the inferred one."""
    out = _output(model, "probs")
    if out is None:
        raise ModelError("has no 'probs' output to average", path)
    dims = out.type.tensor_type.shape.dim
    width = dims[1].dim_value if len(dims) == 2 and dims[1].dim_value else None
    if width is None:
        shape = _inferred_shape(_onnx(), model, meta.input_size, "probs")
        width = shape[1] if shape and len(shape) == 2 else None
    if width is not None and width != meta.classes:
        raise ModelError(f"output 'probs' has {width} classes, the metadata says {meta.classes}", path,
                         "members of a fusion must each have the classes their metadata names")


def _output(model: Any, name: str) -> Any | None:
    return next((o for o in model.graph.output if o.name == name), None)


def _scores_shapes_agree(models: Sequence[Any]) -> bool:
    """Score maps can be averaged only when every member's map has the same size; shape inference decides."""
    onnx = _onnx()
    meta = from_props(_props(models[0]), "")
    h, w = meta.input_size
    sizes = [(h, w), (2 * h + 7, 2 * w + 3)] if meta.fully_conv else [(h, w)]
    for hw in sizes:
        shapes = set()
        for model in models:
            shapes.add(_inferred_shape(onnx, model, hw, "scores"))
        if len(shapes) != 1 or None in shapes:
            return False
    return True


def _inferred_shape(onnx: Any, model: Any, hw: tuple[int, int], name: str) -> tuple[int, ...] | None:
    """The inferred shape of output `name` at input size hw, on a weightless copy (cheap for big models)."""
    from onnx import helper

    graph = model.graph
    inp = graph.input[0]
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    nhwc = inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [1, hw[0], hw[1], dims[3]] if nhwc else [1, dims[1], hw[0], hw[1]]
    inputs = [helper.make_tensor_value_info(inp.name, inp.type.tensor_type.elem_type, dims)]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
    out = [helper.make_value_info(name, onnx.TypeProto())]
    g = helper.make_graph(list(graph.node), "probe", inputs, out)
    probe = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False)
    except Exception:
        return None
    for vi in inferred.graph.output:
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            got = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
            return got if got and all(got) else None
    return None


def build_fused(paths: Sequence[str | Path]) -> Any:
    """The fused onnx.ModelProto: members prefixed m0_, m1_, ... share the first member's input."""
    onnx = _onnx()
    from onnx import compose, helper

    paths = [str(p) for p in paths]
    if len(paths) < 2:
        raise ModelError("fusion needs at least two models")
    total = sum(Path(p).stat().st_size for p in paths if Path(p).is_file())
    if total > PROTOBUF_LIMIT:
        raise ModelError(f"the members total {total / 1e9:.1f} GB; one ONNX file is limited to 2 GB",
                         hint="fuse fewer or smaller (fp16) members, or use --ensemble at run time instead")
    models = [_load(p) for p in paths]
    metas = check_compatible(paths, models)
    input_vi = models[0].graph.input[0]
    with_scores = all(_output(m, "scores") is not None for m in models) and _scores_shapes_agree(models)
    nodes, inits, infos = [], [], []
    for i, model in enumerate(models):
        prefixed = compose.add_prefix(model, f"m{i}_")
        g = prefixed.graph
        for node in g.node:  # the prefixed input becomes the shared one
            node.input[:] = [input_vi.name if n == f"m{i}_{input_vi.name}" else n for n in node.input]
        nodes += list(g.node)
        inits += list(g.initializer)
        infos += list(g.value_info)
    outputs = ["probs"] + (["scores"] if with_scores else [])
    for out in outputs:  # ONNX Mean: the element-wise average of its inputs
        nodes.append(helper.make_node("Mean", [f"m{i}_{out}" for i in range(len(models))], [out], name=f"fuse_{out}"))
    graph = helper.make_graph(nodes, "vggspec_ensemble", [input_vi], [_output(models[0], o) for o in outputs],
                              inits, value_info=infos)
    fused = helper.make_model(graph, opset_imports=list(models[0].opset_import),
                              ir_version=max(m.ir_version for m in models), producer_name="vggspec.fuse")
    helper.set_model_props(fused, to_props(_fused_meta(metas, with_scores)))
    onnx.checker.check_model(fused)
    return fused


def _fused_meta(metas: Sequence[Metadata], with_scores: bool) -> Metadata:
    """The first member's metadata, renamed for the ensemble; no one spec describes it, so the members'
    specs are kept side by side, and this vggspec is named as the producer."""
    from ..version import __version__

    names = tuple(m.name for m in metas)
    precisions = {m.precision for m in metas}
    same_labels = all(m.labels == metas[0].labels for m in metas)
    return replace(metas[0], name="+".join(names), members=names, scores=with_scores, spec="",
                   member_specs=tuple(s for m in metas for s in (m.member_specs or (m.spec,))),
                   version=__version__, precision=precisions.pop() if len(precisions) == 1 else "mixed",
                   labels=metas[0].labels if same_labels else ())  # disagreeing names: indices only


def fuse(models: Sequence[str | Path], output: str | Path) -> Path:
    """Write one ONNX graph averaging the posteriors of `models` (atomically); return its path."""
    onnx = _onnx()
    # Checked before the (long) fusion, as well as atomic_path's own checks: writing over a member destroys it.
    check_output_path(output, [(f"model {i} of {len(models)}", m) for i, m in enumerate(models, 1)])
    fused = build_fused(models)
    with atomic_path(output, suffix=".onnx") as tmp:
        onnx.save(fused, str(tmp))
    return Path(output)
