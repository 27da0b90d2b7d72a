"""The training loop: section 3.1's recipe on the module the torch backend generates.

SGD with momentum and weight decay, a global batch built from gradient-accumulation micro-batches
(and split over DDP ranks), the learning rate divided by 10 when validation accuracy stops improving
(at most `max_decreases` times) or after the epochs `lr_steps` names, checkpoints every epoch and every
`save_every` steps, and a clean stop on a non-finite loss.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, VggspecError
from ..graph import LayerGraph, Preprocessing
from ..weights.checkpoint import training_extra
from . import distributed as D
from .augment import Augment, CenterEval, Lighting, check_scale
from .config import TrainConfig, TrainingNote
from .data import (
    GlobalBatchSampler,
    ImageDataset,
    Split,
    channel_stats,
    collate,
    descriptor_problem,
    eval_batches,
    scan_folder,
)
from .plot import append_metrics, keep_epochs, plot_metrics, read_metrics
from .progress import EpochBar
from .state import (
    MODEL,
    OLD_STATE,
    STATES,
    Progress,
    capture_rng,
    has_run,
    load_state,
    lock_run,
    no_run_error,
    restore_rng,
    save_model,
    save_state,
)

# Decoded images kept in memory (half for train, half for val): small sets skip file I/O each epoch.
PRELOAD_BYTES = 1 << 30

# A run whose step loss stays within STUCK_TOLERANCE x ln(classes) (at most 0.1 nats) of chance, ln(classes),
# for STUCK_STEPS steps in a row has not started to learn. Measured on small nets: a healthy run leaves that
# band within ~50 steps, a stuck one never (its last biases follow each batch's classes: ~2.5% of noise, inside
# the band); but the demo's narrow D on scenes (batch norm, lr 1e-2) sits there for over 400 steps and then
# learns, so the warning is a "not yet", and LEFT_STEPS steps in a row below the band say it took off.
STUCK_STEPS = 100
STUCK_TOLERANCE = 0.05
LEFT_STEPS = 20
# A fresh net without batch norm whose init scales the input's size by less than this on the way to the scores
# (weights.init.signal_gain) starts at chance and stays there. The paper's A on its unnormalised pixels (~60x a
# spec's input) sits above it, as do the nets measured to leave chance; D, and narrow nets, fall far below.
MIN_SIGNAL_GAIN = 1e-5


def _quoted(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


class TrainingError(VggspecError):
    """Training cannot go on (a non-finite loss); the last good checkpoint stays in RUNDIR."""


# A batch the DataLoader workers have not delivered in this long means they are stuck or gone.
LOADER_TIMEOUT = 600.0
WORKER_HINT = "raise the limit (`ulimit -n 4096`) or load in the main process with --workers 0"


class _Guarded:
    """A DataLoader whose worker failures (no descriptors or processes left to start one, a batch never
    delivered) end the run with a TrainingError, not a traceback per worker and a wait for ever."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        try:
            yield from self.loader
        except OSError as exc:  # EMFILE, EAGAIN: starting a worker process or its pipes failed
            raise TrainingError(f"cannot start DataLoader workers ({exc.strerror or exc})", hint=WORKER_HINT) from None
        except RuntimeError as exc:
            if "DataLoader" not in str(exc):  # not the loader's own: a real bug, keep its traceback
                raise
            raise TrainingError(f"the DataLoader workers failed: {str(exc).splitlines()[0]}",
                                hint=WORKER_HINT) from None


def identity(graph: LayerGraph, sets: tuple[str, ...]) -> str:
    """What a resumed run must match: the spec text and its --set overrides."""
    return graph.meta.spec_text + "".join(f"\n# --set {s}" for s in sets)


def recorded(config: TrainConfig) -> dict[str, Any]:
    """The settings a run's state keeps, with the spec file and the data folder as absolute paths, so that
    `train --resume RUNDIR` alone continues the run from any folder (a shipped spec stays its name)."""
    spec = Path(config.spec)
    return {**config.to_dict(), "spec": os.path.abspath(spec) if spec.is_file() else config.spec,
            "data": os.path.abspath(config.data)}


def default_scale(graph: LayerGraph) -> tuple[int, int]:
    """The paper's S = 256 for 224 crops, in proportion to the spec's input side."""
    s = round(max(graph.meta.input_shape[1:]) * 256 / 224)
    return s, s


def spec_sets_mean(graph: LayerGraph, sets: tuple[str, ...]) -> bool:
    """Whether the spec (or a --set) writes `mean:`. GraphMeta holds only the value, defaults filled in,
    so the spec text is parsed again (a millisecond)."""
    from ..spec import parse

    return "mean" in parse(graph.meta.spec_text, graph.meta.spec_path, tuple(sets), keep_going=True).entries


def check_rundir_outside(rundir: Path, data: Path) -> None:
    """RUNDIR inside --data would be scanned as data on a resume (its metrics.png an image of a class folder
    named after the run): refused, with the folders resolved so that links and `..` do not hide it."""
    run, root = rundir.resolve(), data.resolve()
    if run == root or root in run.parents:
        raise VggspecError("is inside the data folder --data, where its files would become training images",
                           str(rundir), f"train into a folder outside {data}")


def _missing_folders(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed run created, deepest first, as long as they are empty: a run that
    wrote nothing leaves no empty RUNDIR behind; rmdir never removes a file or a folder with one."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (a checkpoint was written), or never created
            return


def set_deterministic() -> None:
    # cuBLAS needs this before its first use to be reproducible; harmless on the CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def train(config: TrainConfig, resume: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume) a run; returns the last epoch's metrics. Call under torchrun for DDP."""
    world = D.setup(config.device)
    made = _missing_folders(Path(config.rundir)) if world.main else []  # only rank 0 creates RUNDIR
    try:
        with lock_run(Path(config.rundir), world.main):  # one process per RUNDIR, for the run's whole life
            result = Trainer(config, world, resume, overrides or {}).run()
    except BaseException:
        D.teardown(world, finished=False)
        _remove_empty(made)
        raise
    D.teardown(world)
    return result


class Trainer:
    """Section 3.1's recipe, one step per line of __init__; run() then trains epoch after epoch."""

    def __init__(self, config: TrainConfig, world: D.World, resume: bool, overrides: dict[str, Any]) -> None:
        from ..graph.load import load_spec

        self.world = world
        self.graph = load_spec(config.spec, config.sets)  # the network, from its spec
        self.rundir = Path(config.rundir)
        self.state = self._resume_state(config, resume)  # the run to continue, or None
        self.config = self._settings(config, overrides)  # a resumed run keeps its own settings
        self.config.check()  # lr, momentum, ...: named errors, not torch's ValueError mid-setup
        self._check_data()  # every input problem surfaces before a model is built
        self._check_init()  # an init that cannot train this net from scratch is said before the first epoch
        self._prepare()  # threads, deterministic kernels, the seeds
        self.pre, self.lighting = self._statistics()  # the input's mean and the training set's colour PCA
        self.model = self._build_model()  # the generated module, initialised or restored
        self.optimizer, self.scheduler = self._optimiser()  # SGD with momentum; lr / 10 on a plateau
        if self.world.main:  # the run folder, once every input (--weights too) has passed its checks
            self.rundir.mkdir(parents=True, exist_ok=True)
        self.progress, self.saved_step = Progress(), 0
        self.at_chance, self.said_stuck = 0, False  # steps in a row with the loss at ln(classes)
        self.below_chance, self.said_left = 0, False  # steps in a row under that band, once said stuck
        self.epochs_at_chance = 0  # epochs the schedule waited for the loss to leave chance
        if self.state is not None:
            self._restore(self.state)  # optimiser, schedule, position in the epoch, random streams
        self.net = self._wrap()  # DDP across processes, torch.compile

    # --- setup -------------------------------------------------------------------------------
    def _settings(self, config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
        if self.state is None:
            return config
        return TrainConfig.from_dict({**self.state["config"], **overrides})

    def _prepare(self) -> None:
        if self.config.deterministic:
            set_deterministic()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self._seed()

    def _optimiser(self) -> tuple[torch.optim.Optimizer, Any]:
        c = self.config
        optimizer = torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum,
                                    weight_decay=c.weight_decay)
        if c.lr_steps:  # stepped once per epoch: milestone e divides the rate for epochs e + 1 on
            return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, list(c.lr_steps), gamma=0.1)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.1, patience=c.patience,
            min_lr=c.lr * 0.1 ** c.max_decreases)  # the floor caps the number of decreases
        return optimizer, scheduler

    def _resume_state(self, config: TrainConfig, resume: bool) -> dict[str, Any] | None:
        if resume:
            return load_state(self.rundir, identity(self.graph, config.sets), warn=self.world.main)
        if (self.rundir / OLD_STATE).is_file():  # not "continue it with --resume": it cannot be
            raise no_run_error(self.rundir)
        if has_run(self.rundir):
            raise VggspecError("already holds a training run", str(self.rundir),
                               "continue it with --resume, or train into another -o folder")
        return None

    def _check_data(self) -> None:
        c, w = self.config, self.world.size
        check_rundir_outside(self.rundir, Path(c.data))
        self.train_split, self.val_split = scan_folder(c.data, self.graph.meta.classes, self.graph.meta.labels)
        self._check_classes()
        self._note_labels()
        self.scale = c.scale or default_scale(self.graph)
        check_scale(self.scale, self.graph.meta.input_shape[1:], c.spec)
        if c.batch_size < 1 or c.accumulate < 1 or c.batch_size % (w * c.accumulate):
            raise VggspecError(f"batch size {c.batch_size} does not split into {w} process(es) x "
                               f"{c.accumulate} accumulation step(s)",
                               hint="the global batch must be divisible by world size x --accumulate")
        if len(self.train_split) < c.batch_size:
            raise DataError(f"the training set has {len(self.train_split)} images, fewer than one batch of "
                            f"{c.batch_size}", str(self.train_split.root), "use a smaller --batch-size")
        self._check_batch_norm()

    def _bn_values(self) -> int:
        """How many values per channel a batch-norm layer with a 1 x 1 output normalises over in training:
        the micro-batch, or under --sync-bn the micro-batches of all processes."""
        c, w = self.config, self.world
        micro = c.batch_size // (w.size * c.accumulate)
        return micro * (w.size if c.sync_bn and w.distributed else 1)

    def _check_batch_norm(self) -> None:
        """torch refuses batch norm in training mode over a single value per channel (a 1 x 1 map, or a
        vector, of one image): say so before training rather than fail at the first step."""
        c = self.config
        # Layers whose statistics are over the batch alone: a micro-batch of 1 makes them one value.
        self.fragile_bn = [layer.name for layer in self.graph.layers
                           if layer.op == "bn" and math.prod(layer.out_shape[1:]) == 1]
        if self.fragile_bn and self._bn_values() == 1:
            raise VggspecError(
                f"batch norm layer {self.fragile_bn[0]} would normalise a single value per channel: its output is "
                f"1 x 1 and each micro-batch holds 1 image ({c.batch_size} images / ({self.world.size} "
                f"process(es) x {c.accumulate} accumulation step(s)))", c.spec,
                "use a larger --batch-size or a smaller --accumulate (2 images or more per micro-batch), "
                "or train with --set norm=none")

    def _note_labels(self) -> None:
        """The checkpoint's labels are the class folders' names, in training order. scan_folder ordered
        the folders by the spec's labels when they are named after them; otherwise say that the names replace
        the spec's labels (the counts agree: scan_folder checked them)."""
        labels, names = self.graph.meta.labels, self.train_split.classes
        if labels and tuple(labels) != tuple(names) and self.state is None and self.world.main:
            warnings.warn(TrainingNote(
                f"the class folders ({_quoted(list(names[:3]))}{', ...' if len(names) > 3 else ''}) are not named "
                f"after the spec's labels ({_quoted(list(labels[:3]))}{', ...' if len(labels) > 3 else ''}); "
                "the checkpoint's labels are the folder names, in sorted order"), stacklevel=2)

    def _check_init(self) -> None:
        """A net without batch norm started from an init that shrinks its signal to nothing stays at chance
        (weights.init.signal_gain says why): say so before the first epoch, with the fix."""
        from ..weights.init import signal_gain

        c = self.config
        if self.state is not None or c.weights or c.init_from or not self.world.main:
            return
        if any(layer.op == "bn" for layer in self.graph.layers):
            return
        gain = signal_gain(self.graph)
        if gain < MIN_SIGNAL_GAIN:
            warnings.warn(f"init: {self.graph.meta.init} starts this net (no batch norm) with class scores about "
                          f"{gain:.0e} times its input's size, so training from scratch will likely stay at chance; "
                          f"use {self._fixes(lr=False)} (the paper trained only A from "
                          "N(0, 0.01), on unnormalised pixels, and started deeper nets from A's layers: --init-from)",
                          stacklevel=2)

    def _check_classes(self) -> None:
        """A resumed run's data must hold the run's class folders: output n was trained on class n, and the
        checkpoint's labels would change under it. (--data may change: the same data moved elsewhere.)"""
        if self.state is None or list(self.state["classes"]) == list(self.train_split.classes):
            return
        had, has = self.state["classes"], self.train_split.classes
        missing, new = [c for c in had if c not in has], [c for c in has if c not in had]
        differ = "; ".join(f"{what} {_quoted(names)}" for what, names in (("missing", missing), ("new", new)) if names)
        raise DataError(f"the class folders differ from the run's ({differ or 'in another order'})",
                        str(self.train_split.root),
                        "resume with the class folders the run started with; for other classes start a new run "
                        f"(--weights {self.rundir / MODEL} starts it from this run's weights)")

    def _seed(self) -> None:
        s = self.config.seed
        random.seed(s)
        np.random.seed(s)
        # Ranks draw different dropout masks; the weights come from the numpy initialisation.
        torch.manual_seed(s + 7919 * self.world.rank)

    def _statistics(self) -> tuple[Preprocessing, Lighting | None]:
        """The input's mean (stored in the checkpoint) and the training set's colour PCA, or the saved ones."""
        meta, c = self.graph.meta, self.graph.meta.input_shape[0]
        if self.state is not None:
            mean, cov = np.array(self.state["stats"]["mean"]), np.array(self.state["stats"]["cov"])
        else:
            data_mean, cov = channel_stats(self.train_split, c, meta.preprocessing.scale, seed=self.config.seed)
            mean = self._mean(data_mean)
        self.stats = {"mean": mean.tolist(), "cov": cov.tolist()}  # the mean used: a resume keeps it
        std = tuple(meta.preprocessing.std) if len(meta.preprocessing.std) == c else (1.0,) * c
        pre = Preprocessing(scale=meta.preprocessing.scale, mean=tuple(float(m) for m in mean), std=std,
                            channel_order=meta.preprocessing.channel_order, layout=meta.preprocessing.layout)
        eigval, eigvec = np.linalg.eigh(cov)
        if self.config.lighting <= 0:
            return pre, None
        return pre, Lighting(np.clip(eigval, 0, None), eigvec, self.config.lighting)

    def _mean(self, data_mean: np.ndarray) -> np.ndarray:
        """The spec's `mean:` when it writes one: the user chose it. Otherwise the training set's mean, the
        paper's recipe, said in a note, since the spec's default mean is then not the one used."""
        if spec_sets_mean(self.graph, self.config.sets):
            return np.array(self.graph.meta.preprocessing.mean, dtype=np.float64)
        if self.world.main:
            values = " ".join(f"{m:.4g}" for m in data_mean)  # as the spec would write it
            warnings.warn(TrainingNote(f"the spec sets no `mean:`, so training subtracts the training set's "
                                       f"mean, {values}"), stacklevel=2)
        return data_mean

    def _initial_weights(self) -> dict[str, np.ndarray] | None:
        from ..weights import check_tensors, load_checkpoint

        c = self.config
        if c.weights:
            ckpt = load_checkpoint(c.weights)
            check_tensors(self.graph, ckpt.tensors, c.weights)
            return ckpt.tensors
        if c.init_from:  # the paper's deeper nets: layers of a shallower net, the rest random
            from ..weights.shallow import init_from_checkpoint

            return init_from_checkpoint(self.graph, c.init_from, self.graph.meta.init, c.seed)
        return None

    def _build_model(self) -> torch.nn.Module:
        from ..backends.torch import to_torch

        weights = None if self.state is not None else self._initial_weights()
        model = to_torch(self.graph, weights=weights, seed=self.config.seed, init=self.graph.meta.init)
        if self.state is not None:
            model.load_state_dict(self.state["model"])
        model = model.to(self.world.device)
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.config.sync_bn:
            from .sync_bn import convert, has_batch_norm

            if not has_batch_norm(model):
                if self.world.main:
                    warnings.warn("--sync-bn: the spec has no batch norm (norm: batch); nothing to synchronise",
                                  stacklevel=2)
            elif self.world.distributed:
                model = convert(model, self.world.device)
        return model.train()

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        p = state["progress"]
        self.progress = Progress(p["epoch"], p["step"], p["global_step"], dict(p["sums"]))
        self.epochs_at_chance = int(state.get("epochs_at_chance", 0))  # the budget and the notes depend on it
        self.saved_step = self.progress.global_step
        restore_rng(state["rng"])
        if self.world.rank:  # other ranks keep their own dropout streams, derived from rank 0's
            torch.manual_seed(int(torch.randint(0, 2**62, ())) + 7919 * self.world.rank)
        if self.world.main:
            keep_epochs(self.rundir, self.progress.epoch)

    def _wrap(self) -> torch.nn.Module:
        net: torch.nn.Module = self.model
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.world.local_rank] if self.world.device.type == "cuda" else None
            net = DistributedDataParallel(net, device_ids=ids)
        if self.config.compile:
            net = torch.compile(net)
        return net

    def _ddp(self) -> Any:
        net = getattr(self.net, "_orig_mod", self.net)  # torch.compile keeps the wrapped module here
        return net if hasattr(net, "no_sync") else None

    # --- data --------------------------------------------------------------------------------
    def _transforms(self) -> tuple[Augment, CenterEval]:
        c, (_, h, w) = self.config, self.graph.meta.input_shape
        pre = replace(self.pre, layout="NCHW")  # what the torch module takes, whatever the export layout
        train = Augment(crop=(h, w), scale=self.scale, preprocessing=pre, flip=c.flip, lighting=self.lighting)
        q = (self.scale[0] + self.scale[1]) // 2  # the paper's test scale for a jittered S
        return train, CenterEval(crop=(h, w), size=q, preprocessing=pre)

    def _dataset(self, split: Split, transform: Any) -> ImageDataset:
        dataset = ImageDataset(split, transform, self.graph.meta.input_shape[0], self.config.seed)
        dataset.preload(PRELOAD_BYTES // 2)
        return dataset

    def _loader(self, dataset: ImageDataset, batches: Any) -> Any:
        problem = descriptor_problem(self.config.workers)
        if problem:  # torch's workers would fail in threads of their own and leave this process waiting
            raise TrainingError(problem, hint=WORKER_HINT)
        # A private generator: the loader must not draw from the global RNG that dropout uses,
        # or a resumed run would see other dropout masks than an uninterrupted one.
        return _Guarded(torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=self.config.workers, collate_fn=collate,
            generator=torch.Generator().manual_seed(self.config.seed),
            pin_memory=self.world.device.type == "cuda", timeout=LOADER_TIMEOUT if self.config.workers else 0))

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        train_tf, eval_tf = self._transforms()
        if self.progress.epoch >= self.budget:  # a resumed run that had already finished
            return {"epoch": self.progress.epoch, "finished": True}
        train_set = self._dataset(self.train_split, train_tf)
        self.val_set = self._dataset(self.val_split, eval_tf)
        self._choose_workers(train_set)
        last: dict[str, Any] = {}
        while self.progress.epoch < self.budget:  # re-read each epoch: a late starter's budget grows
            self._train_epoch(train_set)
            last = self._end_epoch()
        return last

    @property
    def budget(self) -> int:
        """The run's epochs: --epochs, plus the epochs spent at chance before the net started to learn, at most
        --wait-at-chance of them, so that a late starter gets the same epochs of learning as an early one (the
        schedule counts from the start too)."""
        return self.config.epochs + min(self.epochs_at_chance, self.config.wait_at_chance)

    def _choose_workers(self, train_set: ImageDataset) -> None:
        """--workers left out: none when the decoded training set sits in memory (a small set, such as digits:
        workers would only add process start-ups and copies each epoch; 74 epochs of digits on 2 cores took
        60 s without them, 88 s with 2), else 2 to decode and augment beside the training step."""
        if self.config.workers is None:
            whole = len(train_set.cache) == len(self.train_split)
            self.config = replace(self.config, workers=0 if whole else 2)

    def _autocast(self) -> Any:
        if not self.config.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.world.device.type, dtype=torch.bfloat16)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.world.device, non_blocking=True)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.world.device, non_blocking=True)

    def _train_epoch(self, dataset: ImageDataset) -> None:
        c, p, w = self.config, self.progress, self.world
        sampler = GlobalBatchSampler(len(self.train_split), c.batch_size, w.rank, w.size, c.accumulate,
                                     c.seed, p.epoch, start=p.step)
        bar = EpochBar(w.main and c.progress)
        bar.start(p.epoch + 1, self.budget, sampler.steps, p.step)
        ddp, step_sums, t0 = self._ddp(), [0.0, 0.0, 0.0, 0.0], time.perf_counter()
        try:
            for i, (x, y, skipped) in enumerate(self._loader(dataset, sampler)):
                if x is not None and len(y) == 1 and self.fragile_bn:
                    # Skipped images left one: batch norm cannot train on it; skipped and counted too.
                    x, y, skipped = None, None, skipped + 1
                last_micro = (i + 1) % c.accumulate == 0
                sync = nullcontext() if ddp is None or last_micro else ddp.no_sync()
                with sync:
                    loss_sum, correct, count = self._micro_step(x, y)
                step_sums = [a + b for a, b in zip(step_sums, (loss_sum, correct, count, skipped), strict=False)]
                if last_micro:
                    elapsed = time.perf_counter() - t0
                    self._optimizer_step(step_sums, elapsed)
                    bar.update(p.sums["loss"] / max(p.sums["count"], 1), step_sums[2] / max(elapsed, 1e-9))
                    step_sums, t0 = [0.0, 0.0, 0.0, 0.0], time.perf_counter()
        finally:
            bar.stop()

    def _micro_step(self, x: torch.Tensor | None, y: torch.Tensor | None) -> tuple[float, float, float]:
        """Forward and backward on one micro-batch; the loss is scaled so the step's gradient is the batch mean."""
        if x is None:  # every image of this micro-batch was unreadable
            if self._ddp() is None:
                return 0.0, 0.0, 0.0
            # DDP needs every rank in the gradient all-reduce: a zero-gradient backward keeps it in step.
            # Two images: batch norm in training mode refuses a single value per channel.
            x = torch.zeros((2, *self.graph.meta.input_shape), device=self.world.device)
            with self._autocast():
                (self.net(x).float().sum() * 0).backward()
            return 0.0, 0.0, 0.0
        x, y = self._to_device(x, y)
        with self._autocast():
            logits = self.net(x)
        loss = F.cross_entropy(logits.float(), y)
        (loss / self.config.accumulate).backward()
        n = len(y)
        return loss.item() * n, float((logits.argmax(1) == y).sum()), float(n)

    def _optimizer_step(self, sums: list[float], elapsed: float) -> None:
        loss_sum, correct, count, skipped = D.all_sum(self.world, *sums)
        p = self.progress
        if not np.isfinite(loss_sum):
            self.optimizer.zero_grad(set_to_none=True)
            kept = (f"the last good checkpoint (global step {self.saved_step}) is in "
                    f"{self.rundir / STATES / f'{self.saved_step:08d}'}"
                    if self.saved_step else "no checkpoint had been written yet")
            raise TrainingError(
                f"the loss became {loss_sum / max(count, 1):.4g} at epoch {p.epoch + 1}, step {p.step + 1}; "
                f"training stopped; {kept}",
                hint="lower --lr (or check the data); --resume continues from the last checkpoint")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        p.step += 1
        p.global_step += 1
        for key, value in zip(("loss", "correct", "count", "skipped", "seconds"),
                              (loss_sum, correct, count, skipped, elapsed), strict=False):
            p.sums[key] += value
        if count:
            self._watch_chance(loss_sum / count)
        if self.config.save_every and p.global_step % self.config.save_every == 0:
            self.save()

    def _fixes(self, lr: bool = True) -> str:
        """The likely fixes of a run at chance, as options: another init, a lower rate, batch norm."""
        keeps = "--set init=xavier (Glorot's scheme keeps the signal's size)"
        fixes = [] if self.graph.meta.init == "xavier" else [keeps]
        fixes += ["a lower --lr"] if lr else []
        fixes += [] if any(layer.op == "bn" for layer in self.graph.layers) else ["--set norm=batch"]
        return ", or ".join(fixes)

    def _chance(self) -> tuple[float, float]:
        """Chance, ln(classes), and the half-width of the band around it in which a loss has learnt nothing."""
        chance = math.log(self.graph.meta.classes)
        return chance, min(STUCK_TOLERANCE * chance, 0.1)

    def _watch_chance(self, loss: float) -> None:
        """Warn once when the loss has stayed at chance for STUCK_STEPS steps in a row (nothing learnt yet), and
        note once when, after that, it stays below chance for LEFT_STEPS steps (the net took off late)."""
        chance, band = self._chance()
        self.at_chance = self.at_chance + 1 if abs(loss - chance) <= band else 0
        if self.at_chance >= STUCK_STEPS and not self.said_stuck and self.world.main:
            self.said_stuck = True
            warnings.warn(f"the training loss has stayed at chance, ln {self.graph.meta.classes} = {chance:.3f}, for "
                          f"{self.at_chance} steps: the net has not started to learn (some leave chance late, and a "
                          f"note will say so); if it stays there, likely fixes: {self._fixes()}", stacklevel=2)
        self.below_chance = self.below_chance + 1 if loss < chance - band else 0
        if self.said_stuck and not self.said_left and self.below_chance >= LEFT_STEPS and self.world.main:
            self.said_left = True
            step = self.progress.global_step
            warnings.warn(TrainingNote(f"the training loss has left chance (below {chance - band:.3f} for "
                                       f"{LEFT_STEPS} steps, at step {step}): the net is learning after all"),
                          stacklevel=2)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and top-1 / top-5 error at the centre crop over the images that could be used,
        summed over ranks (the count and the skipped images too); DataError when none could."""
        self.model.eval()
        w, k = self.world, min(5, self.graph.meta.classes)
        batches = eval_batches(len(self.val_split), self.config.batch_size // self.config.accumulate, w.rank, w.size)
        loss, top1, top5, n, skipped = 0.0, 0.0, 0.0, 0.0, 0.0
        for x, y, bad in self._loader(self.val_set, batches):
            skipped += bad
            if x is None:
                continue
            x, y = self._to_device(x, y)
            with self._autocast():
                logits = self.model(x).float()
            top = logits.topk(k, 1).indices
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            top1 += float((top[:, 0] == y).sum())
            top5 += float((top == y[:, None]).any(1).sum())
            n += len(y)
        self.model.train()
        loss, top1, top5, n, skipped = D.all_sum(w, loss, top1, top5, n, skipped)  # every rank: the same totals
        if n == 0:  # every rank raises: the totals are shared
            raise DataError(f"no validation image could be used: all {int(skipped)} are unreadable or too large",
                            str(self.val_split.root),
                            "check the val/ images (vggspec predict on one says why it fails); the validation "
                            "error drives the learning-rate schedule, so training needs it")
        return {"val_loss": loss / n, "val_top1_err": 1 - top1 / n, "val_top5_err": 1 - top5 / n,
                "val_skipped": int(skipped)}

    def _check_epoch(self) -> None:
        """An epoch in which no training image could be used (all unreadable, or too large at --scale) took
        no useful step: an error, not a checkpoint. The sums are already totals over the ranks."""
        s = self.progress.sums
        if s["count"] == 0:
            raise DataError(f"no training image of epoch {self.progress.epoch + 1} could be used: all "
                            f"{int(s['skipped'])} are unreadable or too large at the training scale",
                            str(self.train_split.root),
                            "check the train/ images (vggspec predict on one says why it fails) and --scale")

    def _end_epoch(self) -> dict[str, Any]:
        p = self.progress
        self._check_epoch()
        val = self.evaluate()
        s = p.sums
        val_skipped = val.pop("val_skipped")
        row = {"epoch": p.epoch + 1, "step": p.global_step, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": s["loss"] / max(s["count"], 1), "train_top1_err": 1 - s["correct"] / max(s["count"], 1),
               **val, "images_per_s": s["count"] / max(s["seconds"], 1e-9), "seconds": s["seconds"],
               "skipped": int(s["skipped"]), "val_skipped": val_skipped}
        self._schedule(row["train_loss"], 1 - val["val_top1_err"])
        if self.world.main:
            if row["skipped"]:
                warnings.warn(f"epoch {row['epoch']}: {row['skipped']} unreadable training images skipped",
                              stacklevel=2)
            if val_skipped:
                warnings.warn(f"epoch {row['epoch']}: {val_skipped} unreadable validation images skipped; the "
                              "validation error is over the others", stacklevel=2)
            append_metrics(self.rundir, row)
            plot_metrics(self.rundir, read_metrics(self.rundir), self.graph.meta.name)
        self.progress = Progress(p.epoch + 1, 0, p.global_step)
        self.save()
        return row

    def _schedule(self, train_loss: float, val_accuracy: float) -> None:
        """lr / 10 after the epochs `lr_steps` names, or on a plateau of the val accuracy; either counted from
        the first epoch whose training loss has left chance: a net that has not started to learn shows a flat
        val accuracy, and dividing its rate there keeps it at chance (measured: narrow A on scenes sat at chance
        for 7 epochs, the plateau cut its rate twice, and it ended at 89 % error). Said once, when a schedule
        counted from the start would have cut the rate by now."""
        chance, band = self._chance()
        learning = abs(train_loss - chance) > band
        if self.config.lr_steps:
            if learning or self.scheduler.last_epoch > 0:  # once counting, every epoch counts
                self.scheduler.step()
                return
        elif learning:
            self.scheduler.step(val_accuracy)
            return
        self.epochs_at_chance += 1
        first_cut = self.config.lr_steps[0] if self.config.lr_steps else self.config.patience + 1
        if self.epochs_at_chance == first_cut and self.world.main:  # once: the count only grows
            kind = "fixed" if self.config.lr_steps else "plateau"
            wait = self.config.wait_at_chance
            more = (f"; --wait-at-chance adds these epochs to --epochs, up to {wait}" if wait else "")
            warnings.warn(TrainingNote(f"the training loss has been at chance, ln {self.graph.meta.classes}, for "
                                       f"{self.epochs_at_chance} epochs: the learning rate stays at "
                                       f"{self.optimizer.param_groups[0]['lr']:g}, since the {kind} schedule "
                                       f"counts from the epoch the net starts to learn{more}"), stacklevel=2)

    def save(self) -> None:
        """Rank 0 writes a state/ checkpoint (everything a resume needs), then model.safetensors, both atomically."""
        p = self.progress
        self.saved_step = p.global_step
        if not self.world.main:
            return
        payload = {
            "spec_text": identity(self.graph, self.config.sets), "config": recorded(self.config),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "stats": self.stats, "classes": list(self.train_split.classes),
            "progress": {"epoch": p.epoch, "step": p.step, "global_step": p.global_step, "sums": dict(p.sums)},
            "epochs_at_chance": self.epochs_at_chance,
            "rng": capture_rng(),
        }
        save_state(self.rundir, payload)
        extra = {"train.epoch": str(p.epoch), "train.step": str(p.global_step),
                 "train.world_size": str(self.world.size),
                 **training_extra(self.scale, self.config.flip)}  # export makes them the test defaults
        save_model(self.rundir, self.model, self.graph, self.pre, self.train_split.classes, extra, self.config.sets)
