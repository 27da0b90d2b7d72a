"""The results table (printed) and benchmarks/RESULTS.md (machine, date, one table per section, notes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .common import Machine

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass
class Row:
    """One figure: `value` in `unit`; `target` in words and whether it was met (None: no target)."""

    metric: str
    value: float | str
    unit: str = ""
    target: str = ""
    met: bool | None = None
    detail: str = ""  # the raw medians behind a ratio, the spread, ...

    def value_text(self) -> str:
        if isinstance(self.value, str):
            return self.value
        v = self.value
        text = f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return f"{text} {self.unit}".strip()

    def target_text(self) -> str:
        if not self.target:
            return ""
        mark = {True: "met", False: "MISSED", None: "n/a"}[self.met]
        return f"{self.target}: {mark}"


@dataclass
class Section:
    name: str
    title: str
    command: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    contention: str = ""
    others_share: float = 0.0  # fraction of the machine's CPU other processes used during the section
    measured: str = ""  # when the figures were measured, for a section that renders figures from elsewhere

    def add(self, *args: object, **kwargs: object) -> Row:
        row = Row(*args, **kwargs)  # type: ignore[arg-type]
        self.rows.append(row)
        return row


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def print_section(section: Section) -> None:
    print(f"\n== {section.title}  ({section.seconds:.0f} s)  [{section.command}]")
    if section.contention:
        print(f"   ({section.contention})")
    if section.error:
        print(f"   FAILED: {section.error}")
    rows = [[r.metric, r.value_text(), r.target_text(), r.detail] for r in section.rows]
    if rows:
        print("\n".join("   " + line for line in _table(rows, ["metric", "value", "target", "detail"])))
    for note in section.notes:
        print(f"   * {note}")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _machine_md(m: Machine, quick: bool) -> list[str]:
    end = m.load_end or m.load_start
    lines = [
        f"- date: {m.date}" + (" (--quick smoke run: few repetitions, reduced sizes)" if quick else ""),
        f"- CPU: {m.cpu}, {m.cores} logical cores on {m.physical_cores} physical cores "
        f"({m.usable_cores} usable by this process)",
        f"- flags of interest: {', '.join(m.flags) or 'none'}"
        + (" (VNNI present: int8 dot products in hardware)" if m.vnni else " (no VNNI)"),
        f"- memory: {m.memory_gb:.1f} GiB",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m.versions.items()),
        f"- load average (1/5/15 min) at start {m.load_start[0]:.2f}/{m.load_start[1]:.2f}/{m.load_start[2]:.2f}, "
        f"at end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f}",
    ]
    lines += [f"- {k}: {v}" for k, v in m.extra.items()]
    return lines


def _summary(sections: list[Section]) -> list[str]:
    """Every figure that has a target, in one table, so a miss cannot hide in a long section."""
    rows = [(s, r) for s in sections for r in s.rows if r.target]
    if not rows:
        return []
    lines = ["## Targets", "", "| section | figure | value | target | |", "| --- | --- | --- | --- | --- |"]
    for s, r in rows:
        mark = {True: "met", False: "**missed**", None: "n/a"}[r.met]
        lines.append(f"| {s.name} | {_md_escape(r.metric)} | {_md_escape(r.value_text())} | "
                     f"{_md_escape(r.target)} | {mark} |")
    return [*lines, ""]


def _section_md(s: Section, date: str = "") -> list[str]:
    if s.measured:  # the rendering's date and seconds say nothing about those figures
        head = f"Reproduce: `{s.command}` (measured {s.measured}; {s.contention})"
    else:
        when = f"measured {date}; " if date else ""
        head = f"Reproduce: `{s.command}` ({when}{s.seconds:.0f} s" + (f"; {s.contention})" if s.contention else ")")
    lines = [f"## {s.title}", "", head, ""]
    if s.others_share > 0.1:
        lines += [f"**Measured on a contended machine** (other processes used {s.others_share:.0%} of the "
                  "CPU): treat the absolute figures as pessimistic and the ratios as approximate.", ""]
    if s.error:
        lines += [f"**Failed:** {_md_escape(s.error)}", ""]
    if s.rows:
        lines += ["| metric | value | target | detail |", "| --- | --- | --- | --- |"]
        lines += [f"| {_md_escape(r.metric)} | {_md_escape(r.value_text())} | {_md_escape(r.target_text())} "
                  f"| {_md_escape(r.detail)} |" for r in s.rows]
        lines.append("")
    lines += [f"- {n}" for n in s.notes]
    lines.append("")
    return lines


def write_results(sections: list[Section], machine: Machine, quick: bool, path: Path = RESULTS) -> Path:
    lines = ["# vggspec benchmarks", "",
             "Written by `.venv/bin/python -m benchmarks` (see benchmarks/README.md). Every ratio is of two "
             "things measured in this run, interleaved, as medians over repetitions; absolute times are for "
             "this machine only.",
             "", "## Machine", "", *_machine_md(machine, quick), ""]
    lines += _summary(sections)
    for s in sections:
        lines += _section_md(s)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _merge_targets(blocks: list[list[str]], sections: list[Section]) -> None:
    """The summary table keeps other sections' rows and takes the re-run sections' rows afresh."""
    names = {s.name for s in sections}
    fresh = _summary(sections)[4:]  # the rows, without the title and the table header
    at = [i for i, b in enumerate(blocks) if b and b[0] == "## Targets"]
    if not at:
        if fresh:
            blocks.insert(2 if len(blocks) > 2 else len(blocks), _summary(sections))
        return
    block = blocks[at[0]]
    kept = [line for line in block if not (line.startswith("| ") and line.split("|")[1].strip() in names)]
    table_end = max(i for i, line in enumerate(kept) if line.startswith("|")) + 1
    blocks[at[0]] = kept[:table_end] + [line for line in fresh if line.startswith("|")] + kept[table_end:]


def merge_results(sections: list[Section], machine: Machine, path: Path = RESULTS) -> Path:
    """A partial run (--only) replaces its own sections in RESULTS.md and keeps every other one as it was."""
    if not path.exists():
        return write_results(sections, machine, False, path)
    blocks: list[list[str]] = [[]]
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            blocks.append([])
        blocks[-1].append(line)
    for s in sections:
        fresh = _section_md(s, machine.date)
        at = [i for i, b in enumerate(blocks) if b and b[0] == f"## {s.title}"]
        if at:
            blocks[at[0]] = fresh
        else:
            blocks.append(fresh)
    _merge_targets(blocks, sections)
    text = "\n".join("\n".join(b).rstrip() + "\n" for b in blocks if b)
    path.write_text(text.replace("\n## ", "\n\n## ").replace("\n\n\n## ", "\n\n## "))
    return path
