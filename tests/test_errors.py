"""One error root: every exception vggspec raises to a user is a VggspecError, so one `except` catches them all."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import vggspec
from vggspec.errors import PassError, SpecError, VggspecError

# Exceptions that never reach a user, each with where it stops.
INTERNAL = {
    "vggspec.graph.infer.ShapeError": "graph.build turns it into a located SpecError, passes into PassError",
    "vggspec.spec.header.HeaderValueError": "the parser turns it into a located diagnostic",
    "vggspec.serve.batcher.Closed": "serve answers it as a retired model",
    "vggspec.serve.oip.RequestError": "serve answers it as an HTTP status and one line",
    "vggspec.train.state.StateCorrupt": "resume falls back to the previous checkpoint, or says which is damaged",
    "vggspec.cli.common.Terminated": "SIGTERM unwound as Ctrl-C, a KeyboardInterrupt, not an error",
    "vggspec.train.config.TrainingNote": "a warning, not an error",
}


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a vggspec module (modules needing an extra that is missing skipped)."""
    found = {}
    for info in pkgutil.walk_packages(vggspec.__path__, "vggspec."):
        if info.name.endswith("__main__"):  # runs the CLI on import
            continue
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError:
            continue
        for value in vars(module).values():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__:
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


def test_every_user_facing_error_derives_from_vggspec_error() -> None:
    classes = _exception_classes()
    assert "vggspec.train.loop.TrainingError" in classes and "vggspec.errors.PassError" in classes
    stray = sorted(name for name, cls in classes.items()
                   if name not in INTERNAL and not issubclass(cls, VggspecError))
    assert stray == []
    assert sorted(set(INTERNAL) - set(classes)) == []  # the list names no class that is gone


def test_pass_error_is_still_a_value_error() -> None:
    assert issubclass(PassError, ValueError)


def test_spec_error_carries_its_path_and_every_diagnostic() -> None:
    with pytest.raises(VggspecError) as caught:
        vggspec.loads_spec("name: x\ninput: 32x32x3\nclasses: 10\n\nconv3-8\nbogus\nFC-10\nsoftmax\n", "bad.vgg")
    assert isinstance(caught.value, SpecError)
    assert caught.value.path == "bad.vgg" and caught.value.message == caught.value.format()
