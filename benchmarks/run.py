"""The benchmark command: `.venv/bin/python -m benchmarks [--quick] [--only NAME ...]` (or `python benchmarks/run.py`).

Runs the sections in order, prints each one's table as it finishes, and writes benchmarks/RESULTS.md
(a run of every section writes it whole; an --only run replaces just its own sections; a --quick run writes
nothing unless --write is given).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `vggspec` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from .common import Config, CpuSnapshot, describe_machine, load, set_threads  # noqa: E402
from .report import RESULTS, Section, merge_results, print_section, write_results  # noqa: E402

SECTIONS = ("compile", "export", "inference", "precision", "protocols", "training", "gpu", "paper", "ray_eval", "serve")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: one repetition, reduced sizes")
    p.add_argument("--only", action="append", choices=SECTIONS, metavar="NAME",
                   help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    p.add_argument("--reps", type=int, default=None, help="override every section's repetition count")
    p.add_argument("--digits-run", type=Path, default=None, help="a trained digits run folder to reuse")
    p.add_argument("--cache", type=Path, default=None,
                   help="folder for weights and models (default /tmp/vggspec-bench)")
    p.add_argument("--write", action="store_true", help="write RESULTS.md even for a --quick run")
    p.add_argument("--no-write", action="store_true", help="never write RESULTS.md")
    return p.parse_args(argv)


def run_section(name: str, cfg: Config) -> Section:
    """One section; a failure is reported in its table rather than ending the whole run."""
    module = importlib.import_module(f"benchmarks.{name}")
    start, cpu, load_before = time.perf_counter(), CpuSnapshot.now(), load()[0]
    try:
        section = module.run(cfg)
    except Exception as exc:  # a section depending on unfinished pieces must not sink the others
        command = module.command(cfg) if hasattr(module, "command") else ""
        section = Section(name, getattr(module, "TITLE", name), command)
        section.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    section.seconds = time.perf_counter() - start
    if getattr(module, "MEASURED_ELSEWHERE", False):  # this machine's load says nothing about those figures
        section.contention = "rendered here from figures measured on another machine"
        return section
    # How contended the machine was: ratios hold up under load better than absolute times, but not perfectly.
    section.others_share = cpu.others_share(CpuSnapshot.now())
    section.contention = (f"load {load_before:.2f} at the start; other processes used "
                          f"{section.others_share:.0%} of the machine's CPU time during it")
    return section


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg = Config(quick=args.quick, threads=args.threads, digits_run=args.digits_run, reps_override=args.reps)
    if args.cache:
        cfg.cache = args.cache
    set_threads(cfg.threads)
    machine = describe_machine()
    names = [n for n in SECTIONS if not args.only or n in args.only]
    print(f"{machine.cpu}, {machine.usable_cores} cores, load {machine.load_start[0]:.2f}; "
          f"sections: {', '.join(names)}")
    sections = []
    for name in names:
        section = run_section(name, cfg)
        print_section(section)
        sections.append(section)
    machine.load_end = load()
    if not args.no_write and (args.write or not args.quick):
        # A partial run replaces only its own sections, so it never hides the figures of a full one.
        written = merge_results(sections, machine, RESULTS) if args.only else write_results(
            sections, machine, cfg.quick, RESULTS)
        print(f"\nwrote {written}")
    return 1 if any(s.error for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
