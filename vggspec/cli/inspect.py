"""`vggspec summary` and `vggspec graph`: looking at a spec without building anything."""

from __future__ import annotations

import json
import shutil

import click

from .common import check_output, examples, load_graph, not_empty, parse_hw, set_option, spec_argument


@click.command(epilog=examples(
    "vggspec summary D",
    "vggspec summary D --input 384x384 --json",
    "vggspec summary D --set width=1/8 --set input=64x64x3 --set classes=10",
))
@spec_argument
@click.option("--input", "input_hw", metavar="HxW", help="Evaluate the dense form at this input size (e.g. 384x384).")
@click.option("--fully-conv", is_flag=True, help="Summarise the dense-evaluation (fully convolutional) form.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@set_option
def summary(spec: str, input_hw: str | None, fully_conv: bool, as_json: bool, sets: tuple[str, ...]) -> None:
    """Per-layer table: output shape, parameters, MACs, receptive field, and the totals.

    With --input, the network is summarised in its dense-evaluation form at that size,
    as the paper tests it (section 3.2): the parameters stay, the MACs and the score map grow.
    """
    from ..graph import fully_conv as to_dense
    from ..summary import render_table, summary_dict

    graph = load_graph(spec, sets)
    hw = parse_hw(input_hw)
    if fully_conv or hw:
        graph = to_dense(graph, hw)
    if as_json:
        click.echo(json.dumps(summary_dict(graph), indent=2))
        return
    from rich.console import Console

    Console(width=max(100, shutil.get_terminal_size().columns)).print(render_table(graph))


@click.command(epilog=examples(
    "vggspec graph D -o d.svg",
    "vggspec graph D --fully-conv -o d_dense.png",
))
@spec_argument
@click.option("-o", "--output", callback=not_empty, required=True, metavar="FILE",
              help="Picture to write: .svg, .png, .pdf or .dot.")
@click.option("--fully-conv", is_flag=True, help="Draw the dense-evaluation form.")
@set_option
def graph(spec: str, output: str, fully_conv: bool, sets: tuple[str, ...]) -> None:
    """Draw the network: one box per layer with its output shape, grouped by stage."""
    from ..draw import write_picture
    from ..graph import fully_conv as to_dense

    check_output(output, ("SPEC", spec))
    g = load_graph(spec, sets)
    if fully_conv:
        g = to_dense(g)
    path = write_picture(g, output)
    click.echo(f"wrote {path}")


def register(main: click.Group) -> None:
    main.add_command(summary)
    main.add_command(graph)
