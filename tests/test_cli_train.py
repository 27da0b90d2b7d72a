"""`vggspec train` and `vggspec data`: the command line of training (the loop itself: test_train_*.py)."""

from __future__ import annotations

from dataclasses import MISSING, fields

from vggspec.cli.train import train
from vggspec.train.config import DEFAULTS, TrainConfig

# Settings of the recipe that no option changes (--patience's help quotes it).
NO_OPTION = {"max_decreases"}


def test_every_option_default_is_the_train_configs() -> None:
    # What the command passes for an option left out, after click's conversion, against the dataclass.
    ctx = train.make_context("train", ["S", "--data", "d"])
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    optioned = {name: value for name, value in defaults.items() if name not in NO_OPTION}
    assert {name: ctx.params[name] for name in optioned if name in ctx.params} == optioned
    assert set(defaults) - set(ctx.params) == NO_OPTION  # every other default has its option
    assert DEFAULTS == defaults


def test_help_shows_the_defaults() -> None:
    text = " ".join(train.get_help(train.make_context("train", ["--help"], resilient_parsing=True)).split())
    for shown in ("[default: 256;", "[default: 0.01;", "[default: 74;", "[default: 0.0005;", "[default: auto]",
                  "[default: flip]", f"(at most {DEFAULTS['max_decreases']} times)"):
        assert shown in text
