"""A short training on a few hundred scenes learns: the loss falls and accuracy leaves chance far behind.

Small on purpose (32 x 32 scenes, clutter off, a narrow four-layer net) so it runs in seconds; the scale
and position of the digit still vary as in the full data set. No timing assertions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from vggspec.datasets.scenes import write_scenes  # noqa: E402
from vggspec.train import TrainConfig, train  # noqa: E402

SMALL = """name: scenes_small
input: 32x32x3
classes: 10
norm: batch
dropout: 0
init: xavier

conv3-16 maxpool
conv3-32 maxpool
conv3-32 maxpool
FC-64 FC-10 soft-max
"""


def test_short_training_on_scenes_learns(tmp_path: Path) -> None:
    write_scenes(tmp_path / "data", size=32, counts={"train": 400, "val": 100, "test": 0}, digit_range=(20, 32),
                 clutter=0.0)
    spec = tmp_path / "small.vgg"
    spec.write_text(SMALL)
    config = TrainConfig(spec=str(spec), data=str(tmp_path / "data"), rundir=str(tmp_path / "run"), batch_size=16,
                         lr=0.05, epochs=EPOCHS, patience=20, workers=0, scale=(32, 36), flip=False, progress=False,
                         threads=1, deterministic=True)
    train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < 0.8 * rows[0]["train_loss"]
    assert rows[-1]["train_top1_err"] < 0.6  # chance is 0.9
    assert min(r["val_top1_err"] for r in rows) < 0.7


EPOCHS = 20
