"""Where the shipped specs and templates live, installed or in a source checkout."""

from __future__ import annotations

from pathlib import Path

from .errors import SpecNotFoundError

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


def resolve_spec(name_or_path: str | Path) -> Path:
    """A path that exists, or else the shipped spec of that name (`D`, `d`, `D.vgg`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise SpecNotFoundError("is a folder, not a spec file", str(path))
    shipped = {k.lower(): v for k, v in shipped_specs().items()}
    key = path.name.lower().removesuffix(".vgg")
    if len(path.parts) == 1 and key in shipped:
        return shipped[key]
    raise SpecNotFoundError(
        "no such spec file",
        str(path),
        f"shipped specs are {', '.join(shipped_specs())}",
    )
