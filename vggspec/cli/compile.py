"""`vggspec build`, `vggspec init` and `vggspec weights import|export`: the PyTorch side of the compiler.

torch is imported inside the commands that need it (weights import/export of .pth files), never at
import time: `build --target torch` only renders source and runs without torch.
"""

from __future__ import annotations

from pathlib import Path

import click

from .common import bounded, check_output, examples, load_graph, not_empty, set_option, spec_argument

SCHEMES = ("paper", "xavier", "kaiming")  # vggspec.weights.SCHEMES, without importing numpy here


@click.command(epilog=examples(
    "vggspec build D --target torch -o vgg_d.py",
    "vggspec build D --target onnx --set classes=10 -o d10.onnx",
))
@spec_argument
@click.option("--target", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="torch: a standalone PyTorch module (.py); onnx: the ONNX graph with default options.")
@click.option("-o", "--output", callback=not_empty, metavar="OUT",
              help="The file to write (atomically). torch: stdout without it.")
@set_option
def build(spec: str, target: str, output: str | None, sets: tuple[str, ...]) -> None:
    """Compile SPEC to PyTorch source or an ONNX graph.

    The PyTorch module imports only torch and the standard library: a training class named from the
    spec (vgg_d -> VggD, returning logits) and its dense-evaluation twin (VggD.dense() -> VggDDense).
    """
    check_output(output, ("SPEC", spec))
    graph = load_graph(spec, sets)
    if target == "onnx":
        if output is None:
            raise click.UsageError("--target onnx needs -o OUT.onnx")
        from ..backends.onnx import DEFAULT_OPSET, export_onnx
        from .export import _size

        export_onnx(graph, output)
        click.echo(f"wrote {output} ({graph.meta.name}, {_size(Path(output))}, opset {DEFAULT_OPSET}, fp32, "
                   "initialised weights; `vggspec export` takes --weights and the other forms)")
        return
    from ..atomic import write_text_atomic
    from ..backends.torch import class_name, dense_class_name, render_source

    source = render_source(graph)
    if output is None:
        click.echo(source, nl=False)
        return
    write_text_atomic(output, source)
    click.echo(f"wrote {output} (classes {class_name(graph)} and {dense_class_name(graph)})")


@click.command(epilog=examples(
    "vggspec init D --init-from runs/a/model.safetensors -o d_init.safetensors",
    "vggspec init E --init xavier -o e.safetensors",
))
@spec_argument
@click.option("--init", "scheme", type=click.Choice(SCHEMES), default=None,
              help="Initialisation scheme (default: the spec's `init`, else paper).")
@click.option("--init-from", metavar="CKPT", type=click.Path(dir_okay=False),
              help="A shallower net's checkpoint (net A in the paper): copy its first four conv and last three "
                   "FC layers, initialise the rest.")
@click.option("--seed", type=bounded("seed"), default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("-o", "--output", callback=not_empty, required=True, metavar="OUT.safetensors",
              help="The checkpoint to write (atomically).")
@set_option
def init(spec: str, scheme: str | None, init_from: str | None, seed: int, output: str, sets: tuple[str, ...]) -> None:
    """Write an initialised checkpoint of SPEC (section 3.1 of the paper)."""
    from ..checkpoints import init_checkpoint
    from ..weights import save_checkpoint

    check_output(output, ("SPEC", spec), ("--init-from", init_from))
    made = init_checkpoint(spec, scheme, init_from, seed, sets)
    if init_from is not None:
        click.echo(f"copied from {init_from}: " + ", ".join(f"{s}->{t}" if s != t else s for s, t in made.copied))
    save_checkpoint(output, made.checkpoint)
    click.echo(f"wrote {output} ({made.graph.meta.name}, {made.scheme} init, seed {seed})")


@click.group()
def weights() -> None:
    """Convert weights between vggspec checkpoints and torchvision's or the Caffe release's layout."""


@weights.command("import", epilog=examples(
    "vggspec weights import --from torchvision vgg16.pth --spec D -o d.safetensors",
    "vggspec weights import --from caffe VGG_ILSVRC_16_layers.caffemodel --spec D -o d.safetensors"))
@click.option("--from", "source", type=click.Choice(["torchvision", "caffe"]), required=True,
              help="torchvision: a .pth state_dict (features.N, classifier.N); "
                   "caffe: the original release's .caffemodel (or its blobs as .npz/.safetensors).")
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--spec", "spec", required=True, metavar="SPEC",
              help="The spec the weights belong to; with --from torchvision also vgg11..vgg19[_bn].")
@click.option("-o", "--output", callback=not_empty, required=True, metavar="OUT.safetensors",
              help="The checkpoint to write (atomically).")
@set_option
def import_weights(source: str, file: str, spec: str, output: str, sets: tuple[str, ...]) -> None:
    """Import FILE into a vggspec checkpoint, with the source's preprocessing in its metadata."""
    from ..checkpoints import import_checkpoint
    from ..weights import save_checkpoint

    check_output(output, ("FILE", file), ("--spec", spec))
    made = import_checkpoint(source, file, spec, sets)
    if made.note:
        click.echo(f"note: {made.note}", err=True)
    save_checkpoint(output, made.checkpoint)
    click.echo(f"wrote {output} ({made.graph.meta.name}, {len(made.checkpoint.tensors)} tensors from {source})")


@weights.command("export", epilog=examples(
    "vggspec weights export --to torchvision d.safetensors -o vgg16.pth"))
@click.option("--to", "target", type=click.Choice(["torchvision", "caffe"]), required=True,
              help="torchvision: a .pth state_dict for torchvision.models.vggNN[_bn]; caffe: .npz of Caffe blobs.")
@click.argument("checkpoint", metavar="CKPT", type=click.Path(dir_okay=False))
@click.option("-o", "--output", callback=not_empty, required=True, metavar="FILE",
              help="The file to write (atomically).")
def export_weights(target: str, checkpoint: str, output: str) -> None:
    """Export a vggspec checkpoint (its spec read from its metadata) to another layout."""
    from ..checkpoints import export_checkpoint

    check_output(output, ("CKPT", checkpoint))
    made = export_checkpoint(target, checkpoint, output)
    if made.note:
        click.echo(f"note: {made.note}", err=True)
    click.echo(f"wrote {output} ({made.graph.meta.name}, {target} layout)")


def register(main: click.Group) -> None:
    main.add_command(build)
    main.add_command(init)
    main.add_command(weights)
