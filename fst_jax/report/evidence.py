"""A comparison's evidence: headline quantities across seeds, with paired intervals.

Reads every (mode, seed) run's per-problem log (``eval_problems.jsonl``, one line per evaluation:
``EvaluationHook.problems``) into arrays ``[seeds, problems, evaluations]`` over the seeds in
which every mode has logs and the evaluation steps all those runs share, and computes, each with
a 95% interval (``fst_jax.report.stats.bootstrap``: seeds and problems resampled jointly for all
modes, so differences are paired):

- per mode, ``final`` (last shared evaluation) and ``best`` (each seed's best evaluation, then
  the mean over seeds) mean@k and pass@1; ``final ood/<task> mean@k`` / ``pass@1``;
- ``steps to rl's peak``: on the mean@k curve averaged over seeds and problems, the first step
  whose running max reaches rl's peak (a run that never does counts as one evaluation past the
  last step, shown as "never");
- ``KL at matched mean@k (evaluated context | original prompt)``: the matched level is the
  highest mean@k (seeds and problems pooled) that every weight-training mode reached after step
  0; each mode's exact KL per token to the base at its first evaluation at or above it, on
  ``eval.kl_samples`` samples per problem, prompted with the mode's evaluated context or with
  the original prompt;
- fst's ``2x2 <weights>/<context>`` cells (greedy pass@1 at the last shared evaluation);
- for each pair of modes, the difference of every quantity both have, and for scores the number
  of problems it amounts to (difference x problems).

Quantities are named ``"<mode>: <quantity>"`` or ``"<a>-<b>: <quantity>"`` (``check_quantity``);
a comparison config's ``primary_metric`` and ``comparisons`` name those stated before the run,
and the report flags every other one as not pre-stated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fst_jax.config import require
from fst_jax.report.stats import METHOD, bootstrap
from fst_jax.runs import EVAL_PROBLEMS, MODES, WEIGHT_MODES

PAIRS = (("fst", "rl"), ("fst", "gepa"), ("gepa", "rl"))
KL_KEYS = {"evaluated context": "eval/kl_to_base", "original prompt": "eval/kl_to_base_original"}
_MODE = "(" + "|".join(MODES) + ")"
_SCORE = r"(mean@(?P<k>\d+)|pass@1)"
_QUANTITIES = (rf"(final|best) {_SCORE}", r"steps to rl's peak",
               rf"KL at matched mean@(?P<k2>\d+) \((evaluated context|original prompt)\)",
               r"2x2 (base|trained)/(original|evolved)", rf"final ood/\S+ {_SCORE}")


def check_quantity(name: str, k: int) -> None:
    """Raise ``ConfigError`` unless ``name`` is a quantity the report can give (``"fst: best
    mean@4"``, ``"fst-rl: final pass@1"``, ...; see the module doc) with mean@k at ``k``."""
    m = re.fullmatch(rf"{_MODE}(-{_MODE})?: (?P<q>.+)", name)
    require(m is not None and (m.group(3) is None or m.group(1) != m.group(3)),
            f"quantity {name!r} must read '<mode>: <quantity>' or '<a>-<b>: <quantity>' with modes "
            f"from rl, gepa, fst")
    q = next((re.fullmatch(p, m.group("q")) for p in _QUANTITIES if re.fullmatch(p, m.group("q"))), None)
    require(q is not None, f"quantity {name!r}: unknown {m.group('q')!r}; one of {list(_QUANTITIES)}")
    ks = {v for g, v in q.groupdict().items() if g in ("k", "k2") and v is not None}
    require(ks <= {str(k)}, f"quantity {name!r}: the runs evaluate mean@{k}")


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Weights ``[..., n]``: how often each of ``n`` units is drawn in ``idx [..., m]``, over m."""
    return (idx[..., :, None] == np.arange(n)).sum(-2) / idx.shape[-1]


class Logs:
    """The per-problem logs of ``runs`` (``{seed: {mode: RunLogs}}``) as arrays ``[S, P, T]``:
    ``scores[key][mode]`` (per-problem mean over samples), ``kl[key][mode]`` (per-problem KL sum
    over its sampled tokens) and ``tokens[key][mode]``; ``steps`` (T), ``seeds``, ``problems``.
    Seeds where some mode has no log yet are left out, and only the evaluation steps every run
    shares are kept: while a run is unfinished, "final" is the last step all runs reached."""

    def __init__(self, runs: Mapping[int, Mapping[str, Any]]):
        logs = {s: {m: r.folder.rows(EVAL_PROBLEMS) for m, r in rs.items()}
                for s, rs in runs.items()}
        self.modes = sorted({m for rs in runs.values() for m in rs}, key=list(MODES).index)
        self.seeds = [s for s, ls in logs.items()
                      if all(ls.get(m) for m in self.modes)]
        require(bool(self.seeds), "no seed has per-problem logs for every mode")
        by_step = {(s, m): {r["step"]: r for r in logs[s][m]} for s in self.seeds for m in self.modes}
        self.steps = sorted(set.intersection(*(set(v) for v in by_step.values())))
        require(bool(self.steps), "the runs share no evaluation step")
        first = by_step[(self.seeds[0], self.modes[0])][self.steps[0]]
        self.task = first["task"]
        self.example_ids = first["example_ids"]
        for rec in (r[t] for r in by_step.values() for t in self.steps):
            require(rec["example_ids"] == self.example_ids,
                    "runs evaluated different validation problems (eval.seed / num_examples differ)")
        self.problems = len(self.example_ids[self.task])

        def stack(field: str, fn: Callable[[Any], np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
            keys = set.intersection(*(set(r[t].get(field, {})) for r in by_step.values() for t in self.steps))
            return {key: {m: np.stack([np.stack([fn(by_step[(s, m)][t], key) for t in self.steps], -1)
                                       for s in self.seeds]) for m in self.modes} for key in sorted(keys)}

        def score(rec, key):
            a = np.asarray(rec["scores"][key], np.float64)
            return a.mean(-1) if a.ndim == 2 else a

        self.scores = stack("scores", score)
        self.kl = stack("kl", lambda rec, key: (np.asarray(rec["kl"][key], np.float64)
                                                * np.asarray(rec["kl_tokens"][key])).sum(-1))
        self.tokens = stack("kl", lambda rec, key: np.asarray(rec["kl_tokens"][key], np.float64).sum(-1))


def _quantities(logs: Logs, k: int, every: int) -> dict[str, Callable]:
    """Quantity name -> ``f(ws [..., S], wp [..., P]) -> [...]`` given seed and problem weights."""
    steps = np.asarray(logs.steps)
    censor = float(steps[-1] + every)  # "never": one evaluation past the last
    trained = steps > 0
    weight_modes = [m for m in WEIGHT_MODES if m in logs.modes]

    def pooled(x):  # [S, P, T] -> [..., T]
        return lambda ws, wp: np.einsum("...s,spt,...p->...t", ws, x, wp)

    def best(x):
        return lambda ws, wp: (ws * np.einsum("spt,...p->...st", x, wp).max(-1)).sum(-1)

    def first_at(curve, level, mask):  # index of the first t (in mask) with curve >= level
        hit = (curve >= level[..., None] - 1e-12) & mask
        return hit.any(-1), hit.argmax(-1)

    out: dict[str, Callable] = {}
    for key, label in ((f"eval/mean@{k}", f"mean@{k}"), ("eval/pass@1", "pass@1")):
        for m, x in logs.scores.get(key, {}).items():
            out[f"{m}: final {label}"] = (lambda c: lambda ws, wp: c(ws, wp)[..., -1])(pooled(x))
            out[f"{m}: best {label}"] = best(x)
    for key, per_mode in logs.scores.items():
        ood = re.fullmatch(rf"eval/ood/(\S+)/(mean@{k}|pass@1)", key)
        cell = re.fullmatch(r"eval/2x2/(\S+)", key)
        for m, x in per_mode.items():
            if ood:
                out[f"{m}: final ood/{ood[1]} {ood[2]}"] = (lambda c: lambda ws, wp: c(ws, wp)[..., -1])(pooled(x))
            if cell and m == "fst":
                out[f"fst: 2x2 {cell[1]}"] = (lambda c: lambda ws, wp: c(ws, wp)[..., -1])(pooled(x))
    reward = logs.scores.get(f"eval/mean@{k}", {})
    if "rl" in reward:
        for m, x in reward.items():
            def to_peak(ws, wp, x=x):
                peak = pooled(reward["rl"])(ws, wp).max(-1)
                run = np.maximum.accumulate(pooled(x)(ws, wp), -1)
                ok, i = first_at(run, peak, np.ones_like(trained))
                return np.where(ok, steps[i], censor)
            out[f"{m}: steps to rl's peak"] = to_peak
    if weight_modes and trained.any():
        for prompt, kl_key in KL_KEYS.items():
            if kl_key not in logs.kl:
                continue
            for m in weight_modes:
                def kl_at(ws, wp, m=m, kl_key=kl_key):
                    level = np.min([np.where(trained, pooled(reward[w])(ws, wp), -np.inf).max(-1)
                                    for w in weight_modes], 0)
                    _, i = first_at(pooled(reward[m])(ws, wp), level, trained)
                    num, den = pooled(logs.kl[kl_key][m])(ws, wp), pooled(logs.tokens[kl_key][m])(ws, wp)
                    return np.take_along_axis(num / den, i[..., None], -1)[..., 0]
                out[f"{m}: KL at matched mean@{k} ({prompt})"] = kl_at
    return out


def evidence(logs: Logs, k: int, every: int, stated: Mapping[str, str], *, resamples: int = 4999
             ) -> dict[str, Any]:
    """Every quantity and pairwise difference with its interval, as rows ``{"quantity",
    "estimate", "low", "high", "problems" (difference x problems, scores' differences only),
    "pre_stated" ("primary" / "yes" / "no")}``; ``stated`` maps pre-stated names to their flag."""
    per_mode = _quantities(logs, k, every)
    names = list(per_mode)
    diffs = []
    for a, b in PAIRS:
        for name in names:
            if name.startswith(f"{a}: ") and f"{b}: {name[len(a) + 2:]}" in per_mode:
                diffs.append((f"{a}-{b}: {name[len(a) + 2:]}", name, f"{b}: {name[len(a) + 2:]}"))
    S, P = len(logs.seeds), logs.problems

    def statistic(s, p):
        ws, wp = _counts(s, S), _counts(p, P)
        vals = {n: f(ws, wp) for n, f in per_mode.items()}
        return np.stack([vals[n] for n in names] + [vals[x] - vals[y] for _, x, y in diffs])

    intervals = bootstrap(statistic, S, P, resamples=resamples)
    rows = []
    for name, iv in zip(names + [d[0] for d in diffs], intervals):
        score = not re.search(r"steps to|KL at", name)
        rows.append({"quantity": name, "estimate": iv.estimate, "low": iv.low, "high": iv.high,
                     "problems": iv.estimate * P if score and "-" in name.split(":")[0] else None,
                     "pre_stated": stated.get(name, "no")})
    missing = [n for n in stated if n not in {r["quantity"] for r in rows}]
    steps = logs.steps
    return {"method": METHOD, "confidence": 0.95, "resamples": resamples, "seeds": logs.seeds,
            "problems": P, "task": logs.task, "steps": steps, "never": float(steps[-1] + every),
            "rows": rows, "pre_stated_not_reported": missing}


def _fmt(v: float, never: float) -> str:
    """A value; a step count (``never`` finite) as "never" from ``never`` on."""
    if np.isfinite(never):
        return "never" if v >= never else f"{v:g}"
    return f"{v:.4g}" if abs(v) < 1e-3 and v else f"{v:.4f}"


def markdown(ev: dict[str, Any]) -> str:
    never = ev["never"]
    lines = ["# Evidence: every quantity with a 95% interval", "",
             f"Task {ev['task']}: {ev['problems']} validation problems, seeds {ev['seeds']}, evaluations at "
             f"steps {ev['steps']}. Interval: {ev['method']}, {ev['resamples']} resamples. "
             "\"final\" is the last shared evaluation (seeds and problems pooled); \"best\" is each seed's "
             "best evaluation, averaged over seeds; KL is the exact KL per token to the base weights, under "
             f"the named prompt, on {ev.get('kl_samples', '?')} samples per problem. \"problems\" is a difference in numbers of problems (difference x "
             f"{ev['problems']}). A row marked \"no\" was not stated before the run: read it as exploratory.",
             "", "| quantity | estimate | 95% interval | problems | pre-stated |", "|---|---|---|---|---|"]
    for r in ev["rows"]:
        cap = never if "steps to" in r["quantity"] else np.inf
        problems = "-" if r["problems"] is None else f"{r['problems']:+.1f}"
        lines.append(f"| {r['quantity']} | {_fmt(r['estimate'], cap)} | [{_fmt(r['low'], cap)}, "
                     f"{_fmt(r['high'], cap)}] | {problems} | {r['pre_stated']} |")
    if ev["pre_stated_not_reported"]:
        lines += ["", "Pre-stated but not computable from these logs: "
                  + ", ".join(ev["pre_stated_not_reported"]) + "."]
    return "\n".join(lines) + "\n"


def write_evidence(job: Any, runs: Mapping[int, Mapping[str, Any]], out: Path) -> dict[str, Any] | None:
    """``out/evidence.md``, ``evidence.json`` and their figures for a ``CompareJob``'s runs
    (``{seed: {mode: RunLogs}}``); returns the evidence, or None when no run has per-problem logs
    yet, the job is a task schedule (its stages evaluate different problems) or it evaluates
    fewer than 2 problems."""
    from fst_jax.report.figures import plot_kl_vs_reward, plot_seed_curves

    if len(job.stages()) > 1 or not any(r.folder.stream(EVAL_PROBLEMS).exists()
                                        for rs in runs.values() for r in rs.values()):
        return None
    logs = Logs(runs)
    if logs.problems < 2:
        return None
    stated = {name: "yes" for name in job.comparisons}
    if job.primary_metric:
        stated[job.primary_metric] = "primary"
    ev = {**evidence(logs, job.eval.k, job.eval.every, stated), "kl_samples": job.eval.kl_samples}
    out.mkdir(parents=True, exist_ok=True)
    figures = [plot_seed_curves(logs, job.eval.k, out / "evidence_curves.png").name]
    if logs.kl and f"eval/mean@{job.eval.k}" in logs.scores:
        figures.append(plot_kl_vs_reward(logs, job.eval.k, out / "evidence_kl_vs_reward.png").name)
    ev["figures"] = figures
    (out / "evidence.json").write_text(json.dumps(ev, indent=2))
    (out / "evidence.md").write_text(markdown(ev) + "\n" + "\n".join(f"![{f}]({f})" for f in figures) + "\n")
    return ev
