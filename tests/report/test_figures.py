"""Figures: each writes its PNG files from hand-made rows and run folders."""

import json

import pytest

from fst_jax.report.figures import plot_gepa_progress, plot_metrics, plot_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_metrics_writes_reward_and_kl_pngs_per_mode(tmp_path):
    rows = [{"step": s, "mode": m, "eval/mean@4": r, "eval/kl_to_base": kl}
            for m, scale in (("rl", 1.0), ("fst", 1.3))
            for s, r, kl in ((0, 0.1, 0.0), (10, 0.2 * scale, 0.01), (20, 0.15, 0.02))]
    rows.append({"step": 5, "mode": "rl", "train/loss": 0.3})  # non-eval rows are skipped
    files = plot_metrics(rows, tmp_path / "plots")
    assert [f.name for f in files] == ["reward_vs_step.png", "kl_vs_reward.png"]
    assert all(f.read_bytes()[:8] == PNG for f in files)
    with pytest.raises(ValueError, match="mean@k"):
        plot_metrics([{"step": 0, "train/loss": 1.0}], tmp_path)


def test_plot_run_draws_reward_kl_and_kept_contexts_beside_the_logs_and_nothing_before_a_step(tmp_path):
    assert plot_run(tmp_path) == []
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(
        {"step": s, "mode": "fst", "reward_mean": 0.1 * s, "reward_context_0": 0.1, "reward_context_1": 0.2,
         "kl": 0.01 * s}) + "\n" for s in range(4)))
    (tmp_path / "gepa.jsonl").write_text("".join(json.dumps(
        {"step": 2 * c, "cycle": c, "best_anchor_score": 0.5, "contexts": [{"anchor_score": 0.5}, {"anchor_score": 0.25}]})
        + "\n" for c in range(2)))
    files = plot_run(tmp_path)
    assert [f.name for f in files] == ["reward.png", "kl_vs_reward.png", "contexts.png"]
    assert all(f.parent == tmp_path and f.read_bytes()[:8] == PNG for f in files)


def test_plot_gepa_progress_marks_each_proposal_by_outcome(tmp_path):
    history = [{"metric_calls": 4, "best": 0.5, "outcome": "accepted"},
               {"metric_calls": 7, "best": 0.5, "outcome": "rejected"},
               {"metric_calls": 7, "best": 0.5, "outcome": "skipped:perfect"}]
    assert plot_gepa_progress(history, 0.25, tmp_path / "progress.png").read_bytes()[:8] == PNG
