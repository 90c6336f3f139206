"""Figures of a comparison's per-problem logs (``fst_jax.report.evidence.Logs``), across seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fst_jax.report.evidence import KL_KEYS, Logs


def _figure(panels: int):
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(5.5 * panels, 4), layout="constrained")
    return fig, np.atleast_1d(fig.subplots(1, panels))


def plot_seed_curves(logs: Logs, k: int, path: Path) -> Path:
    """mean@k and pass@1 (where logged) against step: one thin line per seed, the mean over
    seeds thick, one colour per mode."""
    keys = [key for key in (f"eval/mean@{k}", "eval/pass@1") if key in logs.scores]
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        for i, (mode, x) in enumerate(logs.scores[key].items()):
            per_seed = x.mean(1)  # [S, T]
            for curve in per_seed:
                ax.plot(logs.steps, curve, color=f"C{i}", lw=0.8, alpha=0.35)
            ax.plot(logs.steps, per_seed.mean(0), color=f"C{i}", lw=2, marker=".", label=mode)
        ax.set(xlabel="RL step", ylabel=key.removeprefix("eval/"),
               title=f"{key.removeprefix('eval/')}: seeds {logs.seeds} (thin), their mean (thick)")
        ax.legend()
    fig.savefig(path, dpi=120)
    return path


def plot_kl_vs_reward(logs: Logs, k: int, path: Path) -> Path:
    """Exact KL per token to the base against mean@k (seeds and problems pooled), one panel per
    prompt the KL was measured under, each point labelled with its step."""
    prompts = [(name, key) for name, key in KL_KEYS.items() if key in logs.kl]
    reward = logs.scores[f"eval/mean@{k}"]
    fig, axes = _figure(len(prompts))
    for ax, (name, key) in zip(axes, prompts):
        for i, mode in enumerate(logs.kl[key]):
            x = reward[mode].mean((0, 1))
            y = logs.kl[key][mode].sum((0, 1)) / logs.tokens[key][mode].sum((0, 1))
            ax.plot(x, y, color=f"C{i}", marker="o", ms=4, lw=1, label=mode)
            for step, xi, yi in zip(logs.steps, x, y):
                ax.annotate(str(step), (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=f"mean@{k} (seeds and problems pooled)", ylabel="KL(pi_theta || pi_base) per token",
               title=f"KL under the {name} vs reward (labels: step)")
        ax.legend()
    fig.savefig(path, dpi=120)
    return path
