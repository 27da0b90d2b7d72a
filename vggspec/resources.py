"""Where the shipped specs and templates live, installed or in a source checkout."""

from __future__ import annotations

from pathlib import Path

from .errors import SpecNotFoundError
from .files import file_problem

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """specs/ or templates/: inside the package when installed, beside it in a checkout."""
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"vggspec's {name}/ folder is missing from the installation")


def shipped_specs() -> dict[str, Path]:
    """The paper's configurations by name: A, A-LRN, B, C, D, E."""
    return {p.stem: p for p in sorted(resource_dir("specs").glob("*.vgg"), key=lambda p: p.stem)}


# Files people pass where a spec goes; their bytes would only fail as "not UTF-8 text".
NOT_SPECS = {".safetensors": "weights file", ".onnx": "model file", ".pt": "PyTorch file", ".pth": "PyTorch file",
             ".caffemodel": "Caffe weights file"}


def resolve_spec(name_or_path: str | Path) -> Path:
    """A path that exists, or else the shipped spec of that name (`D`, `d`, `D.vgg`)."""
    path = Path(name_or_path)
    problem = file_problem(path, "a spec file")
    if problem is None:
        if path.suffix.lower() in NOT_SPECS:
            raise SpecNotFoundError(f"is a {NOT_SPECS[path.suffix.lower()]}, not a spec", str(path),
                                    "a spec is a .vgg text file or a shipped name (A to E); give weights with "
                                    "--weights FILE (a vggspec checkpoint holds its spec: `vggspec export "
                                    "--weights FILE -o OUT.onnx`)")
        return path
    shipped = {k.lower(): v for k, v in shipped_specs().items()}
    key = path.name.lower().removesuffix(".vgg")
    if len(path.parts) == 1 and key in shipped and (problem == "no such file" or path.is_dir()):
        return shipped[key]  # a folder named A cannot be a spec: A is the shipped one
    if problem != "no such file":
        raise SpecNotFoundError(problem, str(path))
    raise SpecNotFoundError("no such spec file", str(path),
                            f"shipped specs are {', '.join(shipped_specs())}")
