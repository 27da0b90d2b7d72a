"""What every command shares: error reporting, the SPEC argument, --set, atomic outputs."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..display import terminal
from ..errors import SpecError, VggspecError

if TYPE_CHECKING:
    from ..graph import LayerGraph

F = TypeVar("F", bound=Callable[..., Any])


# Optional dependencies and the extra that brings each: a missing one is the user's setup, not our bug.
EXTRAS = {"torch": "vggspec[train]", "torchvision": "vggspec[train]", "sklearn": "vggspec[train]",
          "onnxruntime": "vggspec[cpu]", "ray": "vggspec[ray]", "networkx": "vggspec[compile]",
          "jinja2": "vggspec[compile]", "onnx": "vggspec[compile]", "safetensors": "vggspec[compile]",
          "google": "vggspec[compile]", "matplotlib": "vggspec[draw]", "pydot": "vggspec[draw]"}


# Commands whose extra brings more than the first missing module's: `train` on the edge install first misses
# networkx (the compiler, [compile]), but installing [compile] only moves the error to torch. The hint names
# the command's extra whenever it includes the missing module's.
COMMAND_EXTRAS = {"train": "vggspec[train]", "data": "vggspec[train]"}
INCLUDED = {"vggspec[train]": ("vggspec[train]", "vggspec[compile]", "vggspec[draw]")}


def needed_extra(command: str | None, module: str) -> str | None:
    """The extra to install when `command` misses `module`: the command's own when it brings the module's,
    else the module's (None for a module no extra brings: a bug, not the setup)."""
    extra = EXTRAS.get(module.split(".")[0])
    whole = COMMAND_EXTRAS.get(command or "")
    return whole if extra and whole and extra in INCLUDED.get(whole, ()) else extra


def fail(message: str, code: int = 1) -> None:
    """Print one error line on stderr and exit."""
    click.echo(message, err=True)
    sys.exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a scheduler's time limit, torchrun stopping its workers): unwound like Ctrl-C, so every
    `finally` runs: temporaries and a checkpoint's exported models are removed, a training run leaves its group."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the command runs, SIGTERM raises Terminated; a second one during the clean-up is ignored, so the
    clean-up finishes (SIGKILL still stops the process). The previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield
        return

    received = []

    def raise_terminated(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        received.append(signum)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    except Exception as exc:
        if received:  # what the signal became inside C code (an extension's import: "initialization failed")
            raise Terminated() from exc
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:  # swallowed by a library on the way
        raise Terminated()


class ErrorHandlingGroup(click.Group):
    """Turns library errors into `path:line:col: error:` messages and exit codes, never tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with sigterm_as_interrupt():
                return super().invoke(ctx)
        except SpecError as exc:
            fail(terminal(exc.format(), keep_newlines=True), 1)
        except VggspecError as exc:  # every other error of ours, PassError and TrainingError too
            fail(error_text(exc), 1)
        except Terminated:
            fail("terminated", 128 + signal.SIGTERM)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except MemoryError:
            fail("error: out of memory", 1)
        except ModuleNotFoundError as exc:
            extra = needed_extra(ctx.invoked_subcommand, exc.name or "")
            if extra is None:
                _internal(exc)
            fail(f"error: this command needs {exc.name}, which is not installed\n  hint: pip install '{extra}'", 1)
        except OSError as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            fail(f"{where}error: {exc.strerror or exc}", 1)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug of ours: say so in one line; VGGSPEC_DEBUG=1 shows the trace
            _internal(exc)


def error_text(exc: VggspecError) -> str:
    """VggspecError.format() with its path, message and hint escaped for the terminal (display.terminal):
    they quote file and class names, which may hold control characters."""
    where = f"{terminal(exc.path)}: " if exc.path else ""
    text = f"{where}error: {terminal(exc.message)}"
    return f"{text}\n  hint: {terminal(exc.hint)}" if exc.hint else text


def _internal(exc: Exception) -> None:
    if os.environ.get("VGGSPEC_DEBUG"):
        raise exc
    fail(f"internal error: {type(exc).__name__}: {exc} (set VGGSPEC_DEBUG=1 for the traceback)", 70)


def spec_argument(f: F) -> F:
    return click.argument("spec", metavar="SPEC")(f)


def set_option(f: F) -> F:
    return click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a header key for this command, e.g. --set norm=batch --set classes=10.",
    )(f)


def check_output(output: str | None, *inputs: tuple[str, str | None]) -> None:
    """Before any work: refuse an output that is one of the command's inputs ((option, path) pairs),
    which writing it would destroy."""
    if output is not None:
        from ..atomic import check_output_path

        check_output_path(output, inputs)


def load_graph(spec: str, sets: tuple[str, ...] = ()) -> LayerGraph:
    from ..graph.load import load_spec

    return load_spec(spec, sets)


def parse_hw(value: str | None) -> tuple[int, int] | None:
    """`384` or `384x512` to (height, width)."""
    if value is None:
        return None
    parts = value.lower().split("x")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not HxW, e.g. 384x384") from None
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or min(hw) < 1:
        raise click.BadParameter(f"'{value}' is not HxW with positive sizes")
    check_side(hw, value)
    return hw  # type: ignore[return-value]


def check_side(sides: tuple[int, ...], value: str) -> None:
    """The spec's limit on an input side holds for sizes given on the command line too."""
    from ..spec.header import MAX_SIDE

    if max(sides) > MAX_SIDE:
        raise click.BadParameter(f"'{value}' is larger than {MAX_SIDE} on a side")


class FiniteRange(click.FloatRange):
    """A FloatRange that refuses nan and inf too: nan compares false with both ends, so a plain range takes it."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


def not_empty(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A path option or argument given as '': a usage error, not the current folder or the default in disguise."""
    if isinstance(value, str) and not value.strip():
        raise click.BadParameter("is empty; give a path")
    return value


class Bounded(click.IntRange):
    """An IntRange whose usage error ends with a hint: the bounds come from vggspec.limits."""

    def __init__(self, low: int, high: int, hint: str | None = None) -> None:
        super().__init__(low, high)
        self.hint = hint

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as exc:
            if self.hint is None:
                raise
            self.fail(f"{exc.message.rstrip('.')}; give {self.hint}", param, ctx)


def bounded(name: str, low: int = 0) -> Bounded:
    """The option type of a count bounded in vggspec.limits (name: workers, threads, batch_size, epochs, seed)."""
    from .. import limits

    high = {"workers": limits.MAX_WORKERS, "threads": limits.MAX_THREADS, "batch_size": limits.MAX_BATCH_SIZE,
            "epochs": limits.MAX_EPOCHS, "seed": limits.MAX_SEED}[name]
    return Bounded(low, high, limits.hints()[name])


def examples(*lines: str) -> str:
    """A command's epilog: real invocations, kept on their own lines by click's \\b marker."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)
