"""RUNDIR/metrics.jsonl (one JSON object per epoch) and its picture, RUNDIR/metrics.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, write_text_atomic

METRICS = "metrics.jsonl"
PLOT = "metrics.png"


def append_metrics(rundir: Path, row: dict[str, Any]) -> None:
    """Add an epoch's row. The file is rewritten whole and atomically, as every other output: a link there is
    replaced, never followed out of the run, and rows of later epochs (a stale file of an earlier run in the
    folder, an abandoned timeline) are dropped, so the epochs always run 1, 2, ... once each."""
    rows = [r for r in read_metrics(rundir) if r.get("epoch", 0) < row["epoch"]]
    write_text_atomic(rundir / METRICS, "".join(json.dumps(r) + "\n" for r in [*rows, row]))


def read_metrics(rundir: Path) -> list[dict[str, Any]]:
    """The run's rows; none when RUNDIR/metrics.jsonl is missing, or a link (to a file outside the run, perhaps)
    or not a regular file (a pipe would block the read)."""
    path = rundir / METRICS
    if path.is_symlink() or not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
    return rows


def keep_epochs(rundir: Path, epochs: int) -> None:
    """On resume: keep only the rows of completed epochs, so a redone epoch is not listed twice."""
    rows = [r for r in read_metrics(rundir) if r.get("epoch", 0) <= epochs]
    write_text_atomic(rundir / METRICS, "".join(json.dumps(r) + "\n" for r in rows))


def plot_metrics(rundir: Path, rows: list[dict[str, Any]], title: str = "") -> Path:
    """Training loss and validation top-1 / top-5 error (%) per epoch, as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="training loss")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "s--", label="validation loss")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    losses = [r[k] for r in rows for k in ("train_loss", "val_loss")]
    if losses and min(losses) > 0:  # a 1-class run's loss is 0: a log axis has nothing to show, and warns
        ax_loss.set_yscale("log")
    ax_err.plot(epochs, [100 * r["val_top1_err"] for r in rows], "o-", label="val top-1 error")
    ax_err.plot(epochs, [100 * r["val_top5_err"] for r in rows], "s-", label="val top-5 error")
    ax_err.plot(epochs, [100 * r["train_top1_err"] for r in rows], ":", color="gray", label="train top-1 error")
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="error")
    # The rate was divided by 10 after these epochs: the steps the curves usually take there.
    drops = [r["epoch"] + 0.5 for r, nxt in zip(rows, rows[1:], strict=False) if nxt.get("lr", 0) < r.get("lr", 0)]
    for ax in (ax_loss, ax_err):
        for i, x in enumerate(drops):
            ax.axvline(x, color="gray", lw=0.8, ls="--", label="lr / 10" if i == 0 else None)
        ax.grid(alpha=0.3)
        ax.legend()
        if epochs:
            ax.set_xlim(0.5, max(epochs) + 0.5)
    if title:
        fig.suptitle(title)
    path = rundir / PLOT
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
