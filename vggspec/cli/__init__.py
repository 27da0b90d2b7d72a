"""The `vggspec` command line: thin click commands over the library."""

from __future__ import annotations

import importlib

import click

from ..version import __version__
from .common import ErrorHandlingGroup

# Each module registers its commands on `main` through `register(main)`.
COMMAND_MODULES = ("inspect", "compile", "export", "runtime", "train", "serve")


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vggspec")
def main() -> None:
    """Compile VGG-style network specs into PyTorch modules and ONNX graphs, and run them.

    SPEC is a .vgg file, or the name of a shipped configuration: A, A-LRN, B, C, D, E.
    """


for _name in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(main)
