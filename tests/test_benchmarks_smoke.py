"""Smoke test of the benchmark harness: the timing helpers and the compile section in --quick mode (< 20 s)."""

from __future__ import annotations

import time

import pytest

from benchmarks.common import Config, interleave, median, paired_ratio, spread
from benchmarks.report import write_results


def test_interleave_rotates_order_and_skips_warmup() -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = interleave(fns, reps=3, warmup=1)
    assert calls == list("abc" + "abc" + "bca" + "cab")  # warm-up round, then rotated rounds
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}


def test_ratios_are_medians_of_paired_rounds() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert paired_ratio([2.0, 4.0, 100.0], [1.0, 2.0, 1.0]) == 2.0  # one noisy round does not move it
    assert spread([1.0]) == 0.0
    slow = interleave({"slow": lambda: time.sleep(0.02), "fast": lambda: None}, reps=2, warmup=0)
    assert paired_ratio(slow["slow"], slow["fast"]) > 10


@pytest.mark.timeout(60)
def test_compile_section_quick(tmp_path) -> None:
    from benchmarks import compile as compile_section
    from benchmarks.common import describe_machine

    start = time.perf_counter()
    section = compile_section.run(Config(quick=True, cache=tmp_path))
    assert time.perf_counter() - start < 20
    assert not section.error
    names = [r.metric for r in section.rows]
    assert "D: spec -> graph -> torch source" in names
    assert all(isinstance(r.value, float) and r.value > 0 for r in section.rows)
    out = write_results([section], describe_machine(), quick=True, path=tmp_path / "RESULTS.md")
    text = out.read_text()
    assert "CPU:" in text and "| D: spec -> graph -> torch source |" in text


def test_a_partial_run_refreshes_only_its_rows_of_the_targets_table(tmp_path) -> None:
    from benchmarks.common import Machine
    from benchmarks.report import Section, merge_results

    path = tmp_path / "RESULTS.md"
    path.write_text("# r\n\n## Machine\n\n- x\n\n## Targets\n\n| section | figure | value | target | |\n"
                    "| --- | --- | --- | --- | --- |\n| a | fa | 1 | >= 1 | met |\n"
                    "| b | old | 0 | >= 1 | **missed** |\n\n## A\n\nold a\n\n## B\n\nold b\n")
    b = Section("b", "B", "cmd")
    b.add("new", 2.0, "x", ">= 1", True)
    machine = Machine("cpu", 2, 2, 2, [], 1.0, {}, "2026-11-28", (0.0, 0.0, 0.0))
    merge_results([b], machine, path)
    text = path.read_text()
    assert "| a | fa | 1 | >= 1 | met |" in text and "| b | new | 2 x | >= 1 | met |" in text
    assert "| b | old |" not in text and "old a" in text and "old b" not in text


def test_paper_trends_from_synthetic_posteriors(tmp_path) -> None:
    """Section 8's bookkeeping without training: every trend, the fusion choice and the forest plot."""
    from dataclasses import replace

    import numpy as np

    from benchmarks import paper

    rng = np.random.default_rng(0)
    n, scans = 120, np.repeat(np.arange(30), 4)
    targets = np.arange(n) % 10

    def fake(net: str, skill: float) -> paper.Parts:
        post = {}
        for kind in ("dense", "crop"):
            for q in paper._qs(net):
                logits = rng.normal(0, 1, (n, 10))
                logits[np.arange(n), targets] += skill
                e = np.exp(logits)
                post[f"{kind}@{q}"] = e / e.sum(axis=1, keepdims=True)
        return paper.Parts(post, targets, scans)

    # A-LRN untrained (skill 0: chance), as the no-batch-norm nets of 2026-12-05 stayed
    skills = {"A": 2.5, "A-LRN": 0, "B": 3, "C": 3.3, "D": 4.5, "E": 4.5, "D-tune": 4.5, "D-jit": 5,
              "E-jit": 5}
    test = {s: {k: fake(k, v) for k, v in skills.items()} for s in (0, 1, 2)}
    val = {s: {k: test[s][k] for k in paper.FUSION_CANDIDATES} for s in (0, 1, 2)}
    fusion = paper.choose_fusion(val, test)
    trends = paper.all_trends(test, fusion, (0, 1, 2))
    want = {"lrn_no_gain", "depth_helps", "conv1_worse_than_conv3", "jitter_helps", "multiscale_test_helps",
            "combined_best", "fusion_helps", "b_worse_than_c", "e_not_better_than_d"}
    assert want <= set(trends)
    for t in trends.values():
        assert t["verdict"] in ("holds", "contradicts", "inconclusive") and t["holds"] == (t["verdict"] == "holds")
        assert len(t["interval"]) == 2 and t["seeds"] == [0, 1, 2]
    assert trends["depth_helps"]["a_vs_d"]["verdict"] == "holds"  # skill 1 against 3 on 120 images
    assert trends["lrn_no_gain"]["kind"] == "equivalence" and "margin" in trends["lrn_no_gain"]["top1"]
    # A net at chance "loses" to any other: that says nothing about LRN, and the verdict says so.
    assert trends["lrn_no_gain"]["verdict"] == "inconclusive"
    assert trends["lrn_no_gain"]["untrained"] == ["A-LRN dense Q=73"]
    assert all(len(f["pair"]) == 2 for f in fusion.values())
    data = paper.Data(tmp_path, "sha", "medium", 100)
    job = paper.Job("A", "A", 0, data, paper.SETS, "73", 20, paper.SCHEDULES["early"])
    args = job.args(tmp_path, {})
    assert job.steps == (10, 15) and args[args.index("--lr-steps") + 1] == "10,15"
    assert replace(job, epochs=5).steps == (3, 4) and replace(job, epochs=1).steps == ()
    png = tmp_path / "forest.png"
    paper.forest_figure(trends, png)
    assert png.stat().st_size > 1000
