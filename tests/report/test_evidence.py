"""The comparison's evidence on hand-made per-problem logs: quantities, paired differences,
pre-stated flags."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fst_jax.config import ConfigError
from fst_jax.report.evidence import Logs, check_quantity, evidence, markdown
from fst_jax.runs import RunFolder


def write_logs(folder: Path, mode: str, steps, scores, greedy, kl=None, ids=None):
    """``eval_problems.jsonl`` with ``scores [T, P, k]`` (mean@k), ``greedy [T, P]`` (pass@1)
    and ``kl [T, P, 2]`` (per completion, 3 tokens each, under both prompts)."""
    folder.mkdir(parents=True)
    P = np.shape(scores)[1]
    with open(folder / "eval_problems.jsonl", "w") as f:
        for t, step in enumerate(steps):
            rec = {"step": step, "mode": mode, "task": "arithmetic",
                   "example_ids": {"arithmetic": ids or [f"e{i}" for i in range(P)]},
                   "scores": {"eval/mean@2": np.asarray(scores[t]).tolist(),
                              "eval/pass@1": np.asarray(greedy[t]).tolist()}}
            if kl is not None:
                per = np.asarray(kl[t]).tolist()
                rec["kl"] = {"eval/kl_to_base": per, "eval/kl_to_base_original": (2 * np.asarray(kl[t])).tolist()}
                rec["kl_tokens"] = {key: np.full((P, 2), 3).tolist() for key in rec["kl"]}
            f.write(json.dumps({"step": step, **{k: v for k, v in rec.items() if k != "step"}}) + "\n")
    return SimpleNamespace(folder=RunFolder(folder))


def rows(ev):
    return {r["quantity"]: r for r in ev["rows"]}


def test_quantities_on_one_seed_equal_their_hand_computed_values(tmp_path):
    P = 10
    # rl climbs to 0.5 at step 4; fst is at 0.5 from step 2 with half rl's KL there
    rl = [np.zeros((P, 2)), np.r_[np.ones((3, 2)), np.zeros((7, 2))], np.r_[np.ones((5, 2)), np.zeros((5, 2))]]
    fst = [np.zeros((P, 2)), np.r_[np.ones((5, 2)), np.zeros((5, 2))], np.r_[np.ones((6, 2)), np.zeros((4, 2))]]
    kl_rl = [np.zeros((P, 2)), np.full((P, 2), 0.02), np.full((P, 2), 0.04)]
    kl_fst = [np.zeros((P, 2)), np.full((P, 2), 0.01), np.full((P, 2), 0.03)]
    runs = {0: {"rl": write_logs(tmp_path / "rl", "rl", [0, 2, 4], rl, [r[:, 0] for r in rl], kl_rl),
                "fst": write_logs(tmp_path / "fst", "fst", [0, 2, 4], fst, [r[:, 0] for r in fst], kl_fst)}}
    stated = {"fst-rl: best mean@2": "primary", "fst: steps to rl's peak": "yes"}
    ev = evidence(Logs(runs), 2, 2, stated, resamples=999)
    r = rows(ev)
    assert r["rl: final mean@2"]["estimate"] == pytest.approx(0.5)
    assert r["fst: best pass@1"]["estimate"] == pytest.approx(0.6)
    assert r["fst-rl: final mean@2"]["estimate"] == pytest.approx(0.1)
    assert r["fst-rl: final mean@2"]["problems"] == pytest.approx(1.0)  # 0.1 x 10 problems
    assert r["rl: steps to rl's peak"]["estimate"] == 4 and r["fst: steps to rl's peak"]["estimate"] == 2
    # matched level 0.5 (rl's best): rl at step 4 (0.04), fst at step 2 (0.01); doubled under the original prompt
    assert r["rl: KL at matched mean@2 (evaluated context)"]["estimate"] == pytest.approx(0.04)
    assert r["fst: KL at matched mean@2 (evaluated context)"]["estimate"] == pytest.approx(0.01)
    assert r["fst: KL at matched mean@2 (original prompt)"]["estimate"] == pytest.approx(0.02)
    assert r["fst-rl: KL at matched mean@2 (evaluated context)"]["problems"] is None
    for row in ev["rows"]:
        assert row["low"] <= row["estimate"] + 1e-12 and row["estimate"] <= row["high"] + 1e-12, row
    assert r["fst-rl: best mean@2"]["pre_stated"] == "primary" and r["rl: final mean@2"]["pre_stated"] == "no"
    md = markdown(ev)
    assert "| fst-rl: best mean@2 | 0.1000 |" in md and "| primary |" in md


def test_paired_difference_across_seeds_excludes_zero_where_the_modes_intervals_overlap(tmp_path):
    # 3 seeds x 40 problems, k=2: problem difficulty dominates both modes (each problem solves
    # 0, 1 or 2 of its samples, two problems flipped per seed); fst solves one more sample than
    # rl on every fourth problem where rl left one unsolved.
    rng = np.random.default_rng(0)
    solved = rng.integers(0, 3, 40)
    runs = {}
    for seed in range(3):
        rl = (np.arange(2)[None, :] < solved[:, None]).astype(float)
        flip = rng.permutation(40)[:2]
        rl[flip] = 1 - rl[flip]
        fst = rl.copy()
        for i in range(0, 40, 4):
            fst[i, np.argmin(fst[i])] = 1.0
        runs[seed] = {m: write_logs(tmp_path / m / f"seed{seed}", m, [0, 5], [x, x], [x[:, 0], x[:, 0]])
                      for m, x in (("rl", rl), ("fst", fst))}
    ev = evidence(Logs(runs), 2, 5, {}, resamples=1999)
    r = rows(ev)
    a, b, d = r["rl: final mean@2"], r["fst: final mean@2"], r["fst-rl: final mean@2"]
    assert ev["seeds"] == [0, 1, 2] and ev["problems"] == 40
    assert d["estimate"] == pytest.approx(b["estimate"] - a["estimate"]) and d["estimate"] > 0
    assert a["high"] > b["low"]  # apart, the two modes' intervals overlap
    assert d["low"] > 0  # paired over the same problems and seeds, the difference excludes 0
    assert d["problems"] == pytest.approx(d["estimate"] * 40)


def test_logs_refuse_runs_on_different_validation_problems(tmp_path):
    x = [np.zeros((3, 2))]
    runs = {0: {"rl": write_logs(tmp_path / "rl", "rl", [0], x, [np.zeros(3)]),
                "fst": write_logs(tmp_path / "fst", "fst", [0], x, [np.zeros(3)], ids=["a", "b", "c"])}}
    with pytest.raises(ConfigError, match="different validation problems"):
        Logs(runs)


@pytest.mark.parametrize("name", ["fst-rl: best mean@4", "gepa: final pass@1", "rl: steps to rl's peak",
                                  "fst-rl: KL at matched mean@4 (original prompt)", "fst: 2x2 trained/evolved",
                                  "fst-gepa: final ood/rg:products mean@4"])
def test_check_quantity_accepts_every_reported_kind(name):
    check_quantity(name, 4)


@pytest.mark.parametrize("name, match", [("fst-rl best mean@4", "must read"), ("sft: best mean@4", "must read"),
                                         ("fst-fst: best mean@4", "must read"), ("fst: top mean@4", "unknown"),
                                         ("fst: best mean@8", "mean@4")])
def test_check_quantity_rejects_names_the_report_cannot_give(name, match):
    with pytest.raises(ConfigError, match=match):
        check_quantity(name, 4)
