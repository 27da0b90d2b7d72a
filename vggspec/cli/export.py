"""`vggspec export`: the ONNX graph of a spec, standard or dense-evaluation, fp32, fp16 or int8.

Neither torch nor onnxruntime is imported here at import time (onnxruntime only for int8, when asked).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import click

from .common import bounded, check_output, check_side, examples, load_graph, not_empty, set_option


def _size(path: Path) -> str:
    data = path.with_name(path.name + ".data")
    n = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@click.command(epilog=examples(
    "vggspec export D --weights d.safetensors -o d.onnx",
    "vggspec export --weights d.safetensors --fully-conv --flip --scores -o d_dense.onnx",
    "vggspec export D --weights d.safetensors --precision int8 --calibration calib/ -o d_int8.onnx",
    "vggspec export --weights d.safetensors --fully-conv --scores --triton-repo models/ --triton-name d_dense"))
@click.argument("spec", metavar="[SPEC]", required=False)
@click.option("--weights", metavar="CKPT", type=click.Path(dir_okay=False),
              help="A vggspec checkpoint (.safetensors); its preprocessing and labels go into the metadata. "
                   "Without SPEC, the spec is the checkpoint's own. Default: the spec's initialisation, seeded.")
@click.option("--fully-conv", is_flag=True,
              help="Dense evaluation (section 3.2): FC layers as convolutions, any input size.")
@click.option("--flip", is_flag=True, help="Also run the horizontally flipped image and average the posteriors.")
@click.option("--scores", is_flag=True, help="Add a second output, `scores`: the class score map (N, classes, h, w).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp16 keeps float32 inputs and outputs (for GPUs and ARM: x86 CPUs compute it in fp32); "
                   "int8 is static QDQ quantization (needs --calibration).")
@click.option("--calibration", metavar="DIR", type=click.Path(file_okay=False),
              help="Folder of images to calibrate int8 on.")
@click.option("--embed-preprocessing", is_flag=True,
              help="Input `image`: uint8 (N, H, W, C) RGB; scaling and normalisation in the graph.")
@click.option("--opset", type=int, default=None, metavar="N", help="ONNX opset (default 17, IR version 8).")
@click.option("--static-shape", metavar="NxHxW", default=None, callback=lambda ctx, param, v: _static(v),
              help="Fix every input and output dimension, e.g. 1x384x512 (edge compilers, tract, TensorRT).")
@click.option("--seed", type=bounded("seed"), default=0, show_default=True,
              help="Seed of the initialisation when there is no --weights.")
@click.option("-o", "--output", callback=not_empty, metavar="OUT.onnx",
              help="The file to write (atomically). Needed unless --triton-repo.")
@click.option("--triton-repo", metavar="DIR", type=click.Path(file_okay=False),
              help="Also (or instead) write a Triton model repository entry: DIR/NAME/1/model.onnx, "
                   "DIR/NAME/config.pbtxt and DIR/NAME/labels.txt, complete or not at all.")
@click.option("--triton-name", metavar="NAME",
              help="The model's folder and name in --triton-repo (default: the spec's name).")
@click.option("--max-batch", type=click.IntRange(min=0), default=None, metavar="N",
              help="With --triton-repo: Triton's max_batch_size (default 8; 0 for a fixed batch axis).")
@click.option("--max-delay-us", type=click.IntRange(min=0), default=None, metavar="US",
              help="With --triton-repo: the dynamic batcher's max_queue_delay_microseconds (default 0: no "
                   "wait, as `vggspec serve`).")
@click.option("--force", is_flag=True, help="With --triton-repo: replace a model folder of that name.")
@click.option("--test-scales", metavar="Q1,Q2,...", default=None, callback=lambda ctx, param, v: _test_scales(v),
              help="The model's default test scales, written into its metadata for predict, eval and servers. "
                   "Default: from a trained checkpoint's scale range (the paper's {Smin, middle, Smax} for "
                   "jitter, S for a fixed S); none otherwise (the input side).")
@click.option("--test-flip/--no-test-flip", default=None,
              help="Whether predict, eval and servers average the mirror image by default. "
                   "Default: a trained checkpoint's flip policy; unstated otherwise (flip).")
@set_option
def export(spec: str | None, weights: str | None, fully_conv: bool, flip: bool, scores: bool, precision: str,
           calibration: str | None, embed_preprocessing: bool, opset: int | None, static_shape: tuple | None,
           seed: int, output: str | None, triton_repo: str | None, triton_name: str | None, max_batch: int | None,
           max_delay_us: int | None, force: bool, sets: tuple[str, ...], test_scales: tuple[int, ...] | None = None,
           test_flip: bool | None = None) -> None:
    """Compile SPEC to an ONNX model for onnxruntime, without torch.

    Node and initializer names are the spec's layer names (conv1_1, fc6, ...). The metadata
    carries the spec, the preprocessing, the input size, the labels and the export options.
    """
    from ..backends.onnx import DEFAULT_OPSET, ExportOptions, export_onnx

    triton = _triton_options(triton_repo, triton_name, max_batch, max_delay_us, force)
    if output is None and triton is None:
        raise click.UsageError("give -o OUT.onnx, --triton-repo DIR, or both")
    check_output(output, ("SPEC", spec), ("--weights", weights))
    graph, tensors, metadata = _graph_and_weights(spec, weights, sets)
    metadata |= {k: v for k, v in (("test_scales", test_scales), ("test_flip", test_flip)) if v is not None}
    opset = DEFAULT_OPSET if opset is None else opset
    options = ExportOptions(fully_conv=fully_conv, flip=flip, scores=scores, precision=precision,
                            calibration=calibration, embed_preprocessing=embed_preprocessing, opset=opset, seed=seed,
                            static_shape=static_shape, **metadata)
    if output is not None:
        export_onnx(graph, output, weights=tensors, options=options)
    if triton is not None:
        folder = _write_triton(triton, triton_name or graph.meta.name, output,
                               lambda path: export_onnx(graph, path, weights=tensors, options=options))
        click.echo(f"wrote {folder} (Triton model repository entry: 1/model.onnx, config.pbtxt)")
    if output is None:
        return
    traits = [("fully convolutional", fully_conv), ("flips in-graph", flip), ("score map output", scores),
              ("uint8 NHWC input, preprocessing in-graph", embed_preprocessing),
              (f"static shape {'x'.join(map(str, static_shape or ()))}", static_shape is not None),
              (f"tested at Q={','.join(map(str, options.test_scales or ()))}", bool(options.test_scales)),
              ("without flip" if options.test_flip is False else "with flip", options.test_flip is not None)]
    form = "".join(f", {name}" for name, on in traits if on)
    click.echo(f"wrote {output} ({graph.meta.name}, {_size(Path(output))}, opset {opset}, {precision}{form})")


def _triton_options(repo: str | None, name: str | None, max_batch: int | None, delay_us: int | None,
                    force: bool) -> tuple | None:
    """(repo, TritonOptions, force), None without --triton-repo; its options without it are refused, not ignored."""
    if repo is None:
        given = [o for o, v in (("--triton-name", name), ("--max-batch", max_batch), ("--max-delay-us", delay_us),
                                ("--force", force or None)) if v is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)}: for --triton-repo DIR, which is not given")
        return None
    from ..backends.triton import DEFAULT_DELAY_US, DEFAULT_MAX_BATCH, TritonOptions

    options = TritonOptions(DEFAULT_MAX_BATCH if max_batch is None else max_batch,
                            DEFAULT_DELAY_US if delay_us is None else delay_us)
    return repo, options, force


def _write_triton(triton: tuple, name: str, output: str | None, export_to: Callable[[Path], object]) -> Path:
    """The repository entry: the model exported into it, or, when -o was written, a copy of that file."""
    from ..backends.triton import write_repository

    def copy_output(path: Path) -> None:  # external data keeps its name: the model refers to it by name
        import onnx

        model = onnx.load(str(output), load_external_data=False)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            data = Path(f"{output}.data")
            shutil.copyfile(data, path.parent / data.name)
        shutil.copyfile(output, path)

    repo, options, force = triton
    return write_repository(repo, name, copy_output if output else export_to, options, force)


def _test_scales(text: str | None) -> tuple[int, ...] | None:
    """`73,110,146` -> (73, 110, 146)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isascii() and p.isdecimal() and len(p) <= 6 and int(p) > 0 for p in parts):
        raise click.BadParameter(f"'{text}' is not a comma-separated list of positive integers, e.g. 73,110,146")
    return tuple(int(p) for p in parts)


def _static(text: str | None) -> tuple[int, int, int] | None:
    """`1x384x512` -> (1, 384, 512)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.strip().isascii() and p.strip().isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"'{text}' is not NxHxW in positive integers, e.g. 1x384x512")
    check_side(tuple(int(p) for p in parts[1:]), text)
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _graph_and_weights(spec: str | None, weights: str | None, sets: tuple[str, ...]) -> tuple:
    """The graph, the weights (None: initialise) and the checkpoint's labels/preprocessing, from SPEC and --weights."""
    if weights is None:
        if spec is None:
            raise click.UsageError("give SPEC, or --weights CKPT to export the checkpoint's own spec")
        return load_graph(spec, sets), None, {}
    from ..checkpoints import export_inputs

    return export_inputs(spec, weights, sets)


def register(main: click.Group) -> None:
    main.add_command(export)
