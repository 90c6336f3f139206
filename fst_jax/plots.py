"""Figures of a training run folder (``steps.jsonl``, ``gepa.jsonl``), as PNG files beside them.

- ``reward.png``: mean training reward per step (and its running mean over a window), with the
  reward of each context slot in mode gepa / fst;
- ``kl_vs_reward.png``: the KL to the reference against the reward, one point per step;
- ``contexts.png``: the anchor score of every kept context at each GEPA round.
``fst-plot RUN_DIR`` (re)draws them for any run folder, finished or not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fst_jax.metrics import read_jsonl


def running_mean(values, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each index (fewer at the start)."""
    v = np.asarray(values, float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_run(run_dir: str | Path, window: int = 6) -> list[Path]:
    """Draw the run's figures; returns the files written (none if it has no steps yet)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    steps = read_jsonl(run / "steps.jsonl")
    rounds = read_jsonl(run / "gepa.jsonl")
    written: list[Path] = []
    if not steps:
        return written
    mode = steps[-1].get("mode", "")
    x = [r["step"] for r in steps]

    fig, ax = plt.subplots(figsize=(7, 4))
    reward = [r["reward_mean"] for r in steps]
    ax.plot(x, reward, color="0.7", lw=1, label="reward (batch mean)")
    ax.plot(x, running_mean(reward, window), color="tab:blue", lw=2, label=f"running mean ({window})")
    slots = sorted({k for r in steps for k in r if k.startswith("reward_context_")})
    if len(slots) > 1:
        for k in slots:
            ax.plot(x, running_mean([r.get(k, np.nan) for r in steps], window), lw=1, ls="--",
                    label=k.replace("reward_context_", "context slot "))
    ax.set(xlabel="RL step", ylabel="reward", title=f"training reward ({mode})")
    ax.legend(fontsize=8)
    written.append(_save(fig, run / "reward.png"))

    if any("kl" in r for r in steps):
        fig, ax = plt.subplots(figsize=(5, 4))
        pts = [(r["kl"], r["reward_mean"]) for r in steps if "kl" in r]
        sc = ax.scatter(*zip(*pts), c=[r["step"] for r in steps if "kl" in r], cmap="viridis", s=14)
        fig.colorbar(sc, ax=ax, label="step")
        ax.set(xlabel="KL to reference (token mean)", ylabel="reward", title="KL vs reward")
        written.append(_save(fig, run / "kl_vs_reward.png"))

    if rounds:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in rounds:
            scores = [c["anchor_score"] for c in r["contexts"]]
            ax.scatter([r["cycle"]] * len(scores), scores, color="tab:green", s=16)
        ax.plot([r["cycle"] for r in rounds], [r["best_anchor_score"] for r in rounds],
                color="tab:green", label="best anchor score")
        ax.set(xlabel="cycle (GEPA round)", ylabel="anchor score under current weights",
               title="kept contexts per round")
        ax.legend(fontsize=8)
        written.append(_save(fig, run / "contexts.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
