"""The paper's evaluation protocol: mean@k, pass@1, OOD, exact KL to the base model and the 2x2
decomposition, run by the loop's evaluation hook (curves, fits and figures of the results:
``fst_jax.report``).

Metric definitions (host side, NumPy):
- ``mean_at_k(scores [problems, k])``: the mean score over problems and samples;
- ``pass_at_1(scores [problems])``: the mean greedy score (fraction solved for 0/1 rewards).

``make_exact_kl`` builds the one jitted function: ``KL(pi_theta || pi_base)`` summed over the full
vocabulary at each completion position of completions sampled from ``pi_theta``, averaged per
token; the exact value, no estimator. ``EvaluationHook`` runs all of it on a task's fixed
"test" examples every ``every`` steps of the training loop (or once on a checkpoint) and returns
a flat dict of floats; OOD tasks always get their own original prompt, never an evolved one.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import fst_jax.tasks  # noqa: F401  (registers the built-in tasks the config validates against)
from fst_jax.config import require, require_in_registry
from fst_jax.distributed import fetch, same_examples
from fst_jax.generation import Generator, TextGenerator
from fst_jax.models.transformer import positions_from_mask
from fst_jax.rl.batch import TrainBatch, to_global
from fst_jax.rl.shared_prefix import PrefixLayout, choose_layout, prefix_hidden, prompt_runs
from fst_jax.sharding import batch_devices, in_mesh, state_shardings
from fst_jax.tasks.base import TASK_FAMILIES, TASKS, Example, Task, make_task, safe_reward


# -- metric definitions -------------------------------------------------------------------
def _scores(scores: Any, ndim: int, what: str) -> np.ndarray:
    a = np.asarray(scores, np.float64)
    if a.ndim != ndim or a.size == 0:
        raise ValueError(f"{what} needs a non-empty {ndim}-d score array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: scores must be finite")
    return a


def mean_at_k(scores: Any) -> float:
    """Mean score over ``scores [problems, k]`` (k samples per problem at the eval temperature)."""
    return float(_scores(scores, 2, "mean_at_k").mean())


def pass_at_1(scores: Any) -> float:
    """Mean greedy score over ``scores [problems]``: the fraction solved for 0/1 rewards."""
    return float(_scores(scores, 1, "pass_at_1").mean())


# -- exact KL to the base model -----------------------------------------------------------
def chunked_exact_kl(p_model: Any, q_model: Any, xp: jax.Array, xq: jax.Array,
                     chunk: int = 128) -> jax.Array:
    """Exact ``KL(p || q)`` per position, ``[B, T]`` float32: ``sum_v p(v) (log p(v) - log q(v))``
    of the next-token distributions (temperature 1) that ``p_model.logits(xp)`` and
    ``q_model.logits(xq)`` give, from hidden states ``xp``/``xq [B, T, D]`` of the same ``B x T``
    positions (the rows themselves may differ: other prompts before the same completion).
    Logits are formed ``chunk`` positions at a time, each chunk rematerialised in a backward
    pass, so ``[B, T, V]`` is never held. Differentiable in both inputs: stop gradients at the
    call site."""
    B, T, D = xp.shape
    if xq.shape[:2] != (B, T):
        raise ValueError(f"hidden states cover different positions: {xp.shape} vs {xq.shape}")
    n = -(-T // chunk)
    split = lambda x: jnp.pad(x, ((0, 0), (0, n * chunk - T), (0, 0))).reshape(  # noqa: E731
        B, n, chunk, x.shape[-1]).swapaxes(0, 1)

    def one(c):
        lp, lq = (jax.nn.log_softmax(m.logits(x), axis=-1) for m, x in zip((p_model, q_model), c))
        return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)

    kl = jax.lax.map(jax.checkpoint(one), (split(xp), split(xq)))
    return kl.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]


def make_exact_kl(graphdef: nnx.GraphDef, mesh: Mesh | None = None, chunk_tokens: int = 4096
                  ) -> Callable[[nnx.State, nnx.State, Any], tuple[float, np.ndarray]]:
    """``kl(policy_weights, base_weights, batch) -> (token mean, per-row mean [B])``.

    ``batch`` has ``tokens``/``positions`` int32 and ``mask``/``loss_mask`` bool ``[B, T]`` in
    the ``TrainBatch`` layout (``loss_mask[b, t]``: token ``t`` is a completion token). At each
    such ``t`` the exact ``sum_v pi(v) (log pi(v) - log pi_base(v))`` of the two models' next-
    token distributions given ``tokens[b, :t]`` (temperature 1) is taken; the token mean is over
    all completion tokens, the per-row value over each row's (NaN for a row without any).

    Only what the completions need is computed: logits at the columns from the first one holding
    a completion token (``S``), at most ``chunk_tokens`` rows x positions per device at a time
    (``[B, T, V]`` is never held: 4096 x SmolLM2's vocabulary is 0.8 GB of float32), and
    where runs of consecutive rows are equal before ``S`` (a prompt's samples, as
    ``samples_to_rows`` lays them out: found from the data, ``rl.shared_prefix``), each run's
    prompt once. With ``mesh``, rows are padded to a multiple of ``data * fsdp`` (of whole runs)
    and sharded over them, and the weights placed by ``state_shardings`` (a no-op when they
    already are).
    """
    require(chunk_tokens >= 1, "chunk_tokens must be >= 1")
    devices = 1 if mesh is None else batch_devices(mesh)

    @in_mesh(mesh)
    def fn(policy, base, tokens, positions, mask, loss_mask, layout: PrefixLayout):
        models = nnx.merge(graphdef, policy), nnx.merge(graphdef, base)
        S = layout.prompt_len
        if layout.rows > 1:
            xs = [prefix_hidden(m, tokens, positions, mask, layout) for m in models]
        else:
            xs = [m.hidden(tokens, positions, mask)[0][:, S - 1:-1] for m in models]
        kl = chunked_exact_kl(*models, *xs, max(1, chunk_tokens * devices // tokens.shape[0]))
        target = loss_mask[:, S:]
        return jnp.where(target, kl, 0.0).sum(1), target.sum(1)

    jitted = jax.jit(fn, static_argnums=6)

    def kl(policy: nnx.State, base: nnx.State, batch: Any) -> tuple[float, np.ndarray]:
        arrays = [np.asarray(getattr(batch, f)) for f in ("tokens", "positions", "mask", "loss_mask")]
        B, T = arrays[0].shape
        if not arrays[3].any():
            raise ValueError("exact KL: the batch has no completion tokens (loss_mask all False)")
        first, same = (np.asarray(a) for a in prompt_runs(*arrays))
        layout = choose_layout(int(first), same, T, 1, devices) or PrefixLayout(max(int(first), 1), 1)
        rows = _kl_batch(*arrays, layout.rows * devices)
        if mesh is not None:
            rows = to_global(rows, mesh)
            policy, base = (jax.device_put(w, state_shardings(w, mesh)) for w in (policy, base))
        sums, counts = jitted(policy, base, rows.tokens, rows.positions, rows.mask, rows.loss_mask,
                              layout)
        sums, counts = fetch(sums).astype(np.float64)[:B], fetch(counts)[:B]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_row = np.where(counts > 0, sums / counts, np.nan)
        return float(sums.sum() / counts.sum()), per_row

    return kl


def _kl_batch(tokens, positions, mask, loss_mask, multiple: int) -> TrainBatch:
    """A ``TrainBatch`` holding the four arrays the KL reads (other fields zero), rows padded
    with empty rows to a multiple of ``multiple``."""
    B, T = tokens.shape
    pad = -B % multiple
    grow = lambda a: np.concatenate([a, np.zeros((pad, T), a.dtype)]) if pad else a  # noqa: E731
    tokens, positions, mask, loss_mask = map(grow, (tokens, positions, mask, loss_mask))
    rows, zf, zi = B + pad, np.zeros((B + pad, T), np.float32), np.zeros(B + pad, np.int32)
    return TrainBatch(tokens=tokens, positions=positions, mask=mask, completion_mask=loss_mask,
                      loss_mask=loss_mask, sampler_logp=zf, ref_logp=zf, advantages=zi.astype(np.float32),
                      rewards=zi.astype(np.float32), group_ids=np.arange(rows, dtype=np.int32),
                      context_ids=zi, temperature=np.ones(rows, np.float32),
                      completion_budget=np.full(rows, T, np.int32))


def samples_to_rows(samples: Any, multiple: int = 1) -> TrainBatch:
    """Sampler ``Samples`` -> ``TrainBatch`` rows ``[prompt (left-padded) | completion]`` with
    ``loss_mask`` on the generated tokens (advantages, log-probs and rewards left at zero); the
    completion starts at column ``samples.prompts.tokens.shape[1]`` in every row. Empty rows pad
    the count to a multiple of ``multiple`` (e.g. the devices the rows are sharded over)."""
    n = samples.n
    tokens = np.concatenate([np.repeat(samples.prompts.tokens, n, 0), samples.tokens], 1)
    mask = np.concatenate([np.repeat(samples.prompts.mask, n, 0), samples.mask], 1)
    loss_mask = np.concatenate([np.zeros_like(np.repeat(samples.prompts.mask, n, 0)),
                                samples.mask], 1)
    positions = np.asarray(positions_from_mask(jnp.asarray(mask)), np.int32)
    return _kl_batch(tokens.astype(np.int32), positions, mask, loss_mask, multiple)


# -- the 2x2 decomposition ----------------------------------------------------------------
def decomposition_2x2(accuracy_fn: Callable[[Any, str], Any], base_weights: Any,
                      trained_weights: Any, original_context: str, evolved_context: str
                      ) -> dict[str, Any]:
    """pass@1 of {base, trained} weights x {original, evolved} context, as
    ``{"base/original": .., "base/evolved": .., "trained/original": .., "trained/evolved": ..}``
    with ``accuracy_fn(weights, context)`` (a pass@1, or the per-example scores behind it)."""
    weights = {"base": base_weights, "trained": trained_weights}
    contexts = {"original": original_context, "evolved": evolved_context}
    return {f"{w}/{c}": accuracy_fn(wv, cv)
            for w, wv in weights.items() for c, cv in contexts.items()}


# -- the loop hook ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Evaluation every ``every`` steps (0: off) on ``num_examples`` fixed "test" examples of the
    task and of each ``ood_tasks`` name (a task name or ``family:member``), the latter always
    with that task's own ``original_prompt``, never an evolved context.

    ``k`` samples per example at ``temperature`` give mean@k; ``greedy`` adds pass@1;
    ``kl`` adds the exact ``KL(pi_theta || pi_base)`` per completion token on ``kl_samples``
    temperature-1 samples per example, prompted with each of ``kl_contexts`` ("best": the context
    the mode is evaluated with, where its reward is; "original": the task's original prompt, the
    same prompt set in every mode and checkpoint);
    ``two_by_two`` adds greedy pass@1 of the base weights with both contexts (the 2x2).
    ``max_new_tokens`` None keeps the generator's default; ``seed`` picks the examples and the
    samples: each (task, example, context) has its own draws, the same at every evaluation and
    in every mode, so checkpoints and modes are compared on equal draws.
    """

    every: int = 0
    num_examples: int = 64
    k: int = 4
    temperature: float = 0.6
    greedy: bool = True
    kl: bool = True
    kl_contexts: tuple[Literal["best", "original"], ...] = ("best", "original")
    kl_samples: int = 4
    two_by_two: bool = False
    ood_tasks: tuple[str, ...] = ()
    max_new_tokens: int | None = None
    seed: int = 0

    def __post_init__(self):
        require(self.every >= 0, "every must be >= 0 (0 = off)")
        require(self.num_examples >= 1, "num_examples must be >= 1")
        require(self.k >= 1, "k must be >= 1")
        require(self.kl_samples >= 1, "kl_samples must be >= 1")
        require(not self.kl or len(self.kl_contexts) > 0, "kl needs at least one of kl_contexts")
        require(len(set(self.kl_contexts)) == len(self.kl_contexts)
                and set(self.kl_contexts) <= {"best", "original"},
                "kl_contexts must be distinct names from ('best', 'original')")
        require(self.temperature > 0, "temperature must be > 0 (greedy scores are pass@1)")
        require(self.max_new_tokens is None or self.max_new_tokens >= 1,
                "max_new_tokens must be >= 1")
        require(not self.two_by_two or self.greedy, "two_by_two needs greedy (pass@1)")
        require(len(set(self.ood_tasks)) == len(self.ood_tasks), "ood_tasks has duplicates")
        for name in self.ood_tasks:
            if name.split(":", 1)[0] not in TASK_FAMILIES:
                require_in_registry(name, TASKS, "ood task")


@dataclasses.dataclass(frozen=True)
class _Draw:
    """One kind of sample an evaluation prompt gets: ``n`` at these knobs (None: the
    generator's default)."""

    name: Literal["greedy", "sampled", "kl"]
    n: int
    temperature: float
    top_p: float | None = None
    top_k: int | None = None

    def ids(self, key: tuple[str, ...]) -> np.ndarray:
        """``[n]`` sampler draw ids of this kind for one (task, example, context) key: the same
        in every evaluation and mode, whatever else the request holds."""
        first = zlib.crc32("\0".join((*key, self.name)).encode()) % (2**31 // self.n)
        return first * self.n + np.arange(self.n)


Key = tuple[str, str, str]  # (task name, example id, context)


class EvaluationHook:
    """Runs ``EvaluationConfig``'s protocol; keeps the running maxima (``state`` /
    ``load_state`` for checkpoints). ``ood`` overrides the tasks built from
    ``config.ood_tasks`` (same names).

    Each (task, example, context) prompt is sampled once per weights and evaluation: its greedy,
    its ``k`` tempered and (for the KL) its ``kl_samples`` temperature-1 samples in one request,
    so the prompt is prefilled once; the base weights' greedy samples are drawn once for the
    hook's life (the base never changes).

    After each ``run``, ``problems`` holds its per-problem record (JSON values), the line of
    ``eval_problems.jsonl``: ``example_ids`` (task -> ids, in row order), ``scores`` (each
    ``eval.jsonl`` score key -> its per-example scores: ``[n, k]`` for mean@k, ``[n]`` for pass@1
    and the 2x2 cells; their plain mean is the logged value) and, with ``kl``, ``kl`` and
    ``kl_tokens`` (each ``eval/kl_to_base*`` key -> ``[n, kl_samples]`` per-completion KL per
    token and completion lengths; ``sum(kl * tokens) / sum(tokens)`` is the logged value)."""

    def __init__(self, config: EvaluationConfig, ood: Mapping[str, Task] | None = None):
        self.config = config
        if ood is None:
            ood = {name: make_task(name) for name in config.ood_tasks}
        require(sorted(ood) == sorted(config.ood_tasks),
                f"ood tasks {sorted(ood)} differ from config.ood_tasks {sorted(config.ood_tasks)}")
        self.ood = dict(ood)
        self.best: dict[str, float] = {}
        self.problems: dict[str, Any] = {}
        self._examples: dict[str, list[Example]] = {}
        self._kl: tuple[Any, Callable] | None = None
        # Greedy scores of the base weights per key: the base weights never change within a run,
        # so each is graded once (the 2x2's base row, gepa mode's policy).
        self._base_greedy: tuple[Any, dict[Key, np.ndarray]] | None = None

    def due(self, step: int) -> bool:
        return self.config.every > 0 and step % self.config.every == 0

    def state(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.best = {k: float(v) for k, v in state["best"].items()}

    def examples(self, task: Task) -> list[Example]:
        """The task's fixed validation examples (cached per task name)."""
        if task.name not in self._examples:
            made = task.examples("test", self.config.num_examples, seed=self.config.seed)
            self._examples[task.name] = same_examples(made, f"{task.name} test")
        return self._examples[task.name]

    def _base_memo(self, base_params) -> dict[Key, np.ndarray]:
        """Greedy scores ``[1]`` of ``base_params`` per key so far (a new base object: none)."""
        if self._base_greedy is None or self._base_greedy[0] is not base_params:
            self._base_greedy = (base_params, {})
        return self._base_greedy[1]

    def _sample(self, generator, params, base_params, jobs: Mapping[Key, tuple[Task, Example, str]],
                draws_of: Callable[[Key], tuple[_Draw, ...]]
                ) -> tuple[dict[Key, dict[str, np.ndarray]], dict[Key, tuple[np.ndarray, np.ndarray]]]:
        """Each job's draws (``draws_of(key)``, none: skipped) from ``params``, one request per
        distinct tuple of draws: ``(scores, kl)`` with ``scores[key][draw name]`` the rewards
        ``[n]`` and, for a ``kl`` draw, ``kl[key]`` its completions' exact KL to ``base_params``
        per token and lengths (``[n]`` each; KL 0 for an empty completion)."""
        requests: dict[tuple[_Draw, ...], list[Key]] = {}
        for key in jobs:
            if draws := draws_of(key):
                requests.setdefault(draws, []).append(key)
        scores: dict[Key, dict[str, np.ndarray]] = {}
        kl: dict[Key, tuple[np.ndarray, np.ndarray]] = {}
        for draws, keys in requests.items():
            n = sum(d.n for d in draws)
            spans, at = {}, 0
            for d in draws:
                spans[d.name], at = range(at, at + d.n), at + d.n
            request = dict(n=n, seed=self.config.seed, max_new_tokens=self.config.max_new_tokens,
                           prompt_ids=np.stack([np.concatenate([d.ids(key) for d in draws]) for key in keys]),
                           **{knob: [getattr(d, knob) for d in draws for _ in range(d.n)]
                              for knob in ("temperature", "top_p", "top_k")})
            pairs = [(key[2], jobs[key][1].prompt) for key in keys]
            if "kl" in spans:
                batches = self._kl_scorer(generator).generate_many(params, pairs, **request)
                texts = [[generator.decode_row(b, p * n + j) for j in range(n)]
                         for b in batches for p in range(b.prompts.num_prompts)]
                kl.update(zip(keys, (pair for b in batches for pair in self._exact_kl(
                    params, base_params, b.subset(spans["kl"])))))
            else:
                texts = generator.generate_text(params, pairs, **request)
            if len(texts) != len(keys) or any(len(t) != n for t in texts):
                raise ValueError(f"generator returned {len(texts)} groups for {len(keys)} prompts (n={n})")
            for key, outs in zip(keys, texts):
                task, example, _ = jobs[key]
                rewards = np.array([safe_reward(task, example, out)[0] for out in outs])
                scores[key] = {name: rewards[list(span)] for name, span in spans.items()}
        return scores, kl

    def _kl_scorer(self, generator) -> Generator:
        if not isinstance(generator, Generator):
            raise TypeError(f"kl needs a Generator (fst_jax.generation: token-level samples and the "
                            f"weights' graphdef), not a {type(generator).__name__}; set eval.kl=false otherwise")
        if self._kl is None or self._kl[0] is not generator:
            self._kl = (generator, make_exact_kl(generator.graphdef, generator.mesh))
        return generator

    def _exact_kl(self, params, base_params, samples) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per prompt of ``samples``: its completions' KL per token and lengths ``[n]``."""
        _, per_row = self._kl[1](params, base_params, samples_to_rows(samples))
        tokens = samples.mask.sum(1).reshape(-1, samples.n)
        return list(zip(np.where(tokens > 0, per_row.reshape(tokens.shape), 0.0), tokens))

    def run(self, generator: TextGenerator, params, base_params, task: Task, contexts: Sequence[str],
            original_prompt: str | None = None) -> dict[str, float]:
        """Evaluate ``params`` (the current sampling weights) with ``contexts[0]`` (the best
        evolved context; ``[original_prompt]`` in rl mode) and with ``original_prompt``
        (default ``task.original_prompt``).

        ``generator``: a ``TextGenerator``; for ``kl`` a ``Generator`` (``fst_jax.generation``;
        TypeError otherwise). ``base_params``: the base weights
        (for ``kl`` and ``two_by_two``), the same object at every call: their greedy scores are
        computed once per (task, example, context) for the hook's life. Returns floats keyed
        ``eval/mean@{k}``, ``eval/pass@1`` (best context), the same with ``_original`` (original
        prompt), each of those four with ``_max`` (running max over evaluations),
        ``eval/ood/<task>/mean@{k}`` and ``.../pass@1``, ``eval/2x2/{base,trained}/{original,
        evolved}``, ``eval/kl_to_base`` (best context) and ``eval/kl_to_base_original``, as
        configured; ``self.problems`` holds the per-problem record behind them (class doc)."""
        cfg, k = self.config, self.config.k
        if original_prompt is None:
            original_prompt = task.original_prompt
        require(len(contexts) > 0, "contexts must hold at least the original prompt")
        require(base_params is not None or not (cfg.kl or cfg.two_by_two),
                "kl and two_by_two need base_params")
        best_ctx = contexts[0]
        kl_ctx = {w: best_ctx if w == "best" else original_prompt for w in cfg.kl_contexts} if cfg.kl else {}
        main = {(task.name, ex.id, c): (task, ex, c) for ex in self.examples(task)
                for c in (best_ctx, original_prompt)}
        ood = {(t.name, ex.id, t.original_prompt): (t, ex, t.original_prompt)
               for t in self.ood.values() for ex in self.examples(t)}
        memo = self._base_memo(base_params) if cfg.greedy and base_params is not None else {}
        policy_is_base = params is base_params
        greedy, sampled = _Draw("greedy", 1, 0.0), _Draw("sampled", k, cfg.temperature)
        kl_draw = _Draw("kl", cfg.kl_samples, 1.0, 1.0, 0)

        def draws_of(key: Key) -> tuple[_Draw, ...]:
            drawn = (greedy,) if cfg.greedy and not (policy_is_base and key in memo) else ()
            return (*drawn, sampled, *((kl_draw,) if key in main and key[2] in kl_ctx.values() else ()))

        graded, kl = self._sample(generator, params, base_params, {**main, **ood}, draws_of)
        if policy_is_base:
            memo.update({key: g["greedy"] for key, g in graded.items() if "greedy" in g})
        if cfg.two_by_two:  # the base row: only keys the memo lacks
            base, _ = self._sample(generator, base_params, base_params, main,
                                   lambda key: () if key in memo else (greedy,))
            memo.update({key: g["greedy"] for key, g in base.items()})

        def table(t: Task, ctx: str, draw: str, weights: str = "trained") -> np.ndarray:
            keys = [(t.name, ex.id, ctx) for ex in self.examples(t)]
            if draw == "greedy" and (weights == "base" or policy_is_base):
                return np.stack([memo[key] for key in keys])[:, 0]
            rows = np.stack([graded[key][draw] for key in keys])
            return rows[:, 0] if draw == "greedy" else rows

        scores: dict[str, np.ndarray] = {}  # eval.jsonl key -> per-example scores
        scores[f"eval/mean@{k}"] = table(task, best_ctx, "sampled")
        scores[f"eval/mean@{k}_original"] = table(task, original_prompt, "sampled")
        for name, t in self.ood.items():
            scores[f"eval/ood/{name}/mean@{k}"] = table(t, t.original_prompt, "sampled")
        if cfg.greedy:
            scores["eval/pass@1"] = table(task, best_ctx, "greedy")
            scores["eval/pass@1_original"] = table(task, original_prompt, "greedy")
            for name, t in self.ood.items():
                scores[f"eval/ood/{name}/pass@1"] = table(t, t.original_prompt, "greedy")
        if cfg.two_by_two:
            grid = decomposition_2x2(lambda weights, ctx: table(task, ctx, "greedy", weights),
                                     "base", "trained", original_prompt, best_ctx)
            scores.update({f"eval/2x2/{key}": v for key, v in grid.items()})
        out = {key: (mean_at_k(v) if v.ndim == 2 else pass_at_1(v)) for key, v in scores.items()}
        for key in (f"eval/mean@{k}", f"eval/mean@{k}_original", "eval/pass@1",
                    "eval/pass@1_original"):
            if key in out:
                self.best[key] = max(self.best.get(key, -np.inf), out[key])
                out[f"{key}_max"] = self.best[key]
        names = {t.name: [ex.id for ex in self.examples(t)] for t in [task, *self.ood.values()]}
        self.problems = {"example_ids": names, "scores": {key: v.tolist() for key, v in scores.items()}}
        if cfg.kl:
            per_key: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for which, ctx in kl_ctx.items():
                key = "eval/kl_to_base" + ("" if which == "best" else "_original")
                rows = [kl[(task.name, ex.id, ctx)] for ex in self.examples(task)]
                per_key[key] = tuple(np.stack(a) for a in zip(*rows))
                out[key] = kl_token_mean(*per_key[key])
            self.problems.update(kl={key: v[0].tolist() for key, v in per_key.items()},
                                 kl_tokens={key: v[1].tolist() for key, v in per_key.items()})
        return out


def kl_token_mean(kl: Any, tokens: Any) -> float:
    """The mean KL per completion token of completions with per-token KL ``kl`` and lengths
    ``tokens`` (same shapes): ``sum(kl * tokens) / sum(tokens)``."""
    kl, tokens = np.asarray(kl, np.float64), np.asarray(tokens, np.float64)
    require(kl.shape == tokens.shape and tokens.sum() > 0, "kl and tokens: same shapes, some tokens")
    return float((kl * tokens).sum() / tokens.sum())
