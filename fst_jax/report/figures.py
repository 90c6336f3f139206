"""Every figure, in one style: ``matplotlib.figure.Figure`` (no pyplot, no global backend
state), constrained layout, panels of 6 x 4 inches (5.5 x 4 side by side), PNG at 120 dpi,
one colour per mode or arm (``C0``, ``C1``, ... in order).

- a run folder's (``plot_run``, also ``fst-plot RUN_DIR``): ``reward.png``, ``kl_vs_reward.png``
  (training KL against training reward, per step), ``contexts.png`` (kept contexts per round);
- evaluation rows (``plot_metrics``): ``reward_vs_step.png``, ``kl_vs_reward.png``;
- a comparison's: training reward, sigmoid fits, continual stages; across seeds
  (``plot_seed_curves``, ``plot_kl_vs_reward``);
- the plasticity probe's curves and a GEPA round's progress.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fst_jax.report.curves import SigmoidFit, running_max, running_mean
from fst_jax.report.evidence import KL_KEYS, Logs
from fst_jax.runs import GEPA, STEPS, RunFolder, RunLogs


def _figure(panels: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4) if panels == 1 else (5.5 * panels, 4), layout="constrained")
    return fig, np.atleast_1d(fig.subplots(1, panels))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path


# -- a run folder -------------------------------------------------------------------------
def plot_run(run_dir: str | Path, window: int = 6) -> list[Path]:
    """A run folder's figures from ``steps.jsonl`` and ``gepa.jsonl``, beside them: training
    reward per step with its running mean over ``window`` (and each context slot's in modes
    gepa / fst), the training KL against the reward, the anchor score of every kept context at
    each GEPA round. Returns the files written (none before the first step)."""
    folder = RunFolder(run_dir)
    steps, rounds = folder.rows(STEPS), folder.rows(GEPA)
    written: list[Path] = []
    if not steps:
        return written
    mode = steps[-1].get("mode", "")
    x = [r["step"] for r in steps]

    fig, (ax,) = _figure()
    reward = [r["reward_mean"] for r in steps]
    ax.plot(x, reward, color="0.7", lw=1, label="reward (batch mean)")
    ax.plot(x, running_mean(reward, window), color="C0", lw=2, label=f"running mean ({window})")
    slots = sorted({k for r in steps for k in r if k.startswith("reward_context_")})
    if len(slots) > 1:
        for k in slots:
            ax.plot(x, running_mean([r.get(k, np.nan) for r in steps], window), lw=1, ls="--",
                    label=k.replace("reward_context_", "context slot "))
    ax.set(xlabel="RL step", ylabel="reward", title=f"Training reward ({mode})")
    ax.legend(fontsize=8)
    written.append(_save(fig, folder.path / "reward.png"))

    if any("kl" in r for r in steps):
        fig, (ax,) = _figure()
        pts = [(r["kl"], r["reward_mean"]) for r in steps if "kl" in r]
        sc = ax.scatter(*zip(*pts), c=[r["step"] for r in steps if "kl" in r], cmap="viridis", s=14)
        fig.colorbar(sc, ax=ax, label="step")
        ax.set(xlabel="KL to reference (token mean)", ylabel="reward", title="Training KL vs reward")
        written.append(_save(fig, folder.path / "kl_vs_reward.png"))

    if rounds:
        fig, (ax,) = _figure()
        for r in rounds:
            scores = [c["anchor_score"] for c in r["contexts"]]
            ax.scatter([r["cycle"]] * len(scores), scores, color="C2", s=16)
        ax.plot([r["cycle"] for r in rounds], [r["best_anchor_score"] for r in rounds],
                color="C2", label="best anchor score")
        ax.set(xlabel="cycle (GEPA round)", ylabel="anchor score under current weights",
               title="Kept contexts per round")
        ax.legend(fontsize=8)
        written.append(_save(fig, folder.path / "contexts.png"))
    return written


# -- evaluation rows ----------------------------------------------------------------------
def _reward_key(rows: Sequence[Mapping[str, Any]]) -> str:
    keys = sorted({k for r in rows for k in r if re.fullmatch(r"eval/mean@\d+", k)})
    if not keys:
        raise ValueError("no eval/mean@k values in these metrics rows")
    return keys[0]


def _by_mode(rows, *keys) -> dict[str, list[tuple[float, ...]]]:
    out: dict[str, list[tuple[float, ...]]] = {}
    for r in rows:
        if all(k in r and r[k] is not None for k in keys):
            out.setdefault(str(r.get("mode", "run")), []).append(tuple(float(r[k]) for k in keys))
    return {m: sorted(v) for m, v in out.items()}


def plot_metrics(rows: Sequence[Mapping[str, Any]], out_dir: str | Path,
                 reward_key: str | None = None) -> list[Path]:
    """PNG plots of evaluation rows (dicts with "step", optional "mode", and ``eval/...`` keys;
    one line per mode): ``reward_vs_step.png`` (running max of ``reward_key``, default the
    ``eval/mean@k`` key) and, when rows carry ``eval/kl_to_base``, ``kl_vs_reward.png`` (each
    point labelled with its step). Returns the files written."""
    key = reward_key or _reward_key(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax,) = _figure()
    for mode, pts in _by_mode(rows, "step", key).items():
        steps, vals = zip(*pts)
        ax.plot(steps, running_max(vals), marker=".", label=mode)
    ax.set(xlabel="RL step", ylabel=f"{key} (running max)", title="Validation reward")
    ax.legend()
    written = [_save(fig, out_dir / "reward_vs_step.png")]
    kl = _by_mode(rows, key, "eval/kl_to_base", "step")
    if kl:
        fig, (ax,) = _figure()
        for mode, pts in kl.items():
            x, y, _ = zip(*pts)
            ax.scatter(x, y, label=mode, s=14)
            for xi, yi, step in pts:
                ax.annotate(f"{step:g}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=key, ylabel="KL(pi_theta || pi_base) per token",
               title="KL (evaluated context) vs reward; labels: step")
        ax.legend()
        written.append(_save(fig, out_dir / "kl_vs_reward.png"))
    return written


# -- a comparison -------------------------------------------------------------------------
def plot_training_reward(runs: Mapping[str, RunLogs], path: Path, window: int = 6) -> Path:
    """Each mode's running mean of the training reward against step."""
    fig, (ax,) = _figure()
    for mode, run in runs.items():
        if run.steps:
            ax.plot([r["step"] for r in run.steps],
                    running_mean([r["reward_mean"] for r in run.steps], window), label=mode)
    ax.set(xlabel="RL step", ylabel=f"training reward (running mean of {window})",
           title="Training reward")
    ax.legend()
    return _save(fig, path)


def plot_fits(runs: Mapping[str, RunLogs], fits: Mapping[str, dict], key: str, path: Path) -> Path:
    """Each mode's ``key`` against step with its sigmoid fit (``fits[mode]``: a ``SigmoidFit``
    as a dict, or one without ``A`` when the fit failed)."""
    fig, (ax,) = _figure()
    for i, (mode, run) in enumerate(runs.items()):
        steps, vals = run.curve(key)
        if not steps:
            continue
        color = f"C{i}"
        ax.scatter(steps, vals, s=12, color=color, label=f"{mode} ({key})")
        fit = fits.get(mode, {})
        if "A" in fit:
            grid = np.linspace(min(steps), max(steps), 200)
            ax.plot(grid, SigmoidFit(**fit).predict(grid), color=color, lw=1.5,
                    label=f"{mode} fit A={fit['A']:.3f} C_mid={fit['C_mid']:.0f} B={fit['B']:.2f}")
    ax.set(xlabel="RL step", ylabel=key, title="Sigmoid fits (ScaleRL form)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_continual(table: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Bars per schedule stage: each mode's best accuracy normalised by the stage's best."""
    fig, (ax,) = _figure()
    modes = list(table[0]["normalised"])
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        vals = [row["normalised"][mode] or 0.0 for row in table]
        ax.bar(np.arange(len(table)) + i * width, vals, width, label=mode)
    ax.set_xticks(np.arange(len(table)) + width * (len(modes) - 1) / 2,
                  [f"{row['task']}\n{row['start']}-{row['end']}" for row in table], fontsize=7)
    ax.set(ylabel="best accuracy in stage / best of any mode", title="Continual learning, per stage")
    ax.legend()
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


# -- the plasticity probe and a GEPA round -------------------------------------------------
def plot_plasticity(curves: Mapping[str, tuple[list[int], list[float]]], key: str, task: str,
                    path: Path) -> Path:
    """Task B's validation ``key`` against step, one curve per arm."""
    fig, (ax,) = _figure()
    for arm, (steps, vals) in curves.items():
        ax.plot(steps, vals, marker="o", ms=3, label=f"from {arm} weights")
    ax.set(xlabel=f"RL step on {task}", ylabel=key, title="Plasticity: fresh RL on task B")
    ax.legend()
    return _save(fig, path)


def plot_gepa_progress(history: Sequence[Mapping[str, Any]], seed_score: float, path: Path) -> Path:
    """A GEPA round's best anchor score against metric calls, every proposal marked by its
    outcome (``GEPAOptimizer.history``)."""
    fig, (ax,) = _figure()
    xs = [0] + [h["metric_calls"] for h in history]
    ax.step(xs, [seed_score] + [h["best"] for h in history], where="post", label="best anchor score")
    styles = {"accepted": ("o", "C2"), "rejected": ("x", "C3")}
    for outcome, (marker, color) in styles.items():
        pts = [(h["metric_calls"], h["best"]) for h in history if h["outcome"] == outcome]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=outcome, zorder=3)
    skipped = [(h["metric_calls"], h["best"]) for h in history if h["outcome"].startswith("skipped")]
    if skipped:
        ax.scatter(*zip(*skipped), marker=".", color="0.5", label="skipped", zorder=3)
    ax.set(xlabel="metric calls", ylabel="mean anchor score", title="GEPA on frozen weights")
    ax.legend()
    return _save(fig, path)
