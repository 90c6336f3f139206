"""Evaluation protocol: metric definitions, exact KL against NumPy, the 2x2, and the loop hook
(stub generator and the real sampler on a tiny model)."""

import dataclasses
import json
import zlib

import numpy as np
import pytest
from flax import nnx

from fst_jax.config import ConfigError
from fst_jax.evaluation import (EvaluationConfig, EvaluationHook, decomposition_2x2, kl_token_mean,
                                make_exact_kl, mean_at_k, pass_at_1, samples_to_rows)
from fst_jax.models.configs import tiny
from fst_jax.models.tokenizer import ByteChatTokenizer
from fst_jax.models.transformer import init_model
from fst_jax.rl.advantages import AdvantageConfig
from fst_jax.rl.batch import build_train_batch
from fst_jax.sampling import Sampler, SamplingConfig
from fst_jax.sharding import MeshConfig, make_mesh
from fst_jax.tasks.arithmetic import ArithmeticTask
from fst_jax.tasks.base import register_task

HINT = "Think step by step."


# -- metric definitions -------------------------------------------------------------------
def test_mean_at_k_and_pass_at_1_on_hand_worked_scores():
    assert mean_at_k([[1, 0, 1, 1], [0, 0, 0, 1]]) == pytest.approx(4 / 8)
    assert mean_at_k([[0.5, 1.0]]) == pytest.approx(0.75)
    assert pass_at_1([1, 0, 0]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("fn, bad", [(mean_at_k, [1, 0]), (mean_at_k, np.zeros((0, 4))),
                                     (mean_at_k, [[1, np.nan]]), (pass_at_1, [[1, 0]])])
def test_metrics_reject_wrong_shapes_and_non_finite_scores(fn, bad):
    with pytest.raises(ValueError):
        fn(bad)


# -- exact KL -----------------------------------------------------------------------------
MODEL = tiny("llama")


def kl_batch(rows=5, seed=0, samples=1):
    """``rows`` prompts, each repeated for ``samples`` consecutive rows with its own completion."""
    rng = np.random.default_rng(seed)
    prompts = [p for _ in range(rows) for p in [rng.integers(1, MODEL.vocab_size, rng.integers(3, 10))] * samples]
    rows *= samples
    comps = [rng.integers(1, MODEL.vocab_size, rng.integers(1, 12)) for _ in range(rows)]
    return build_train_batch(prompts, comps, [np.zeros(len(c)) for c in comps], [0.0] * rows,
                             list(range(rows)), [0] * rows, pad_id=0,
                             advantage=AdvantageConfig(drop_zero_variance=False))


def numpy_kl(policy_model, base_model, batch):
    """Per-position exact KL from full float64 log-softmaxes, then token and row means."""
    args = (batch.tokens, batch.positions, batch.mask)
    def log_softmax(x):
        x = np.asarray(x, np.float64)
        top = x.max(-1, keepdims=True)
        return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))

    lp, lb = (log_softmax(m(*args)) for m in (policy_model, base_model))
    kl = (np.exp(lp) * (lp - lb)).sum(-1)[:, :-1]  # position t predicts token t + 1
    m = batch.loss_mask[:, 1:]
    return (kl * m).sum() / m.sum(), (kl * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("samples", [1, 3], ids=["own-prompts", "prompts-shared-by-3-rows"])
@pytest.mark.parametrize("mesh_cfg, chunk", [(None, 7), (MeshConfig(data=2, fsdp=2, tensor=2), 4096),
                                             (MeshConfig(data=2, fsdp=4), 5)])
def test_exact_kl_equals_numpy_full_vocabulary_kl_per_completion_token(mesh_cfg, chunk, samples):
    policy, base = init_model(MODEL, seed=1), init_model(MODEL, seed=2)
    graphdef, pw = nnx.split(policy)
    bw = nnx.state(base)
    mesh = make_mesh(mesh_cfg) if mesh_cfg else None
    batch = kl_batch(samples=samples)
    mean, per_row = make_exact_kl(graphdef, mesh, chunk_tokens=chunk)(pw, bw, batch)
    want_mean, want_rows = numpy_kl(policy, base, batch)
    assert mean > 1e-3
    np.testing.assert_allclose(mean, want_mean, rtol=1e-4)
    np.testing.assert_allclose(per_row, want_rows, rtol=1e-4)
    same, _ = make_exact_kl(graphdef, mesh, chunk_tokens=chunk)(pw, pw, batch)
    assert abs(same) < 1e-6


def test_exact_kl_refuses_a_batch_without_completion_tokens():
    graphdef, w = nnx.split(init_model(MODEL))
    batch = kl_batch()
    batch = batch.replace(loss_mask=np.zeros_like(batch.loss_mask))
    with pytest.raises(ValueError, match="no completion tokens"):
        make_exact_kl(graphdef)(w, w, batch)


# -- the 2x2 ------------------------------------------------------------------------------
def test_2x2_puts_each_weights_and_context_pair_in_its_cell():
    table = {("B", "orig"): 0.02, ("B", "evo"): 0.116, ("T", "orig"): 0.106, ("T", "evo"): 0.212}
    calls = []

    def accuracy(weights, context):
        calls.append((weights, context))
        return table[(weights, context)]

    grid = decomposition_2x2(accuracy, "B", "T", "orig", "evo")
    assert grid == {"base/original": 0.02, "base/evolved": 0.116, "trained/original": 0.106,
                    "trained/evolved": 0.212}
    assert sorted(calls) == sorted(table)


# -- the hook with a stub generator -------------------------------------------------------
@register_task("arithmetic-ood-test")
class OodArithmetic(ArithmeticTask):
    name = "arithmetic-ood-test"

    def examples(self, split, n, seed=0):
        return [dataclasses.replace(ex, id=f"ood-{ex.id}", prompt=f"(OOD) {ex.prompt}")
                for ex in super().examples(split, n, seed + 1000)]


class StubGenerator:
    """Answers example ``i`` (in the order of its task's test split) correctly iff
    ``i < params["skill"] + (2 if HINT in context else 0)``; sampled (temperature > 0) answers
    only on even sample indices. Records every call."""

    def __init__(self, tasks, n_examples):
        self.index = {ex.prompt: (i, ex.answer) for t in tasks
                      for i, ex in enumerate(t.examples("test", n_examples, seed=0))}
        self.calls = []
        self.ids = {}

    def generate_text(self, params, pairs, n=1, seed=0, temperature=None, top_p=None, top_k=None,
                      max_new_tokens=None, prompt_ids=None):
        temperature = list(np.broadcast_to(temperature, (n,)))
        self.calls.append((params["skill"], list(pairs), n, temperature))
        self.ids.update(zip(pairs, map(tuple, np.reshape(prompt_ids, (len(pairs), -1)))))
        out = []
        for context, prompt in pairs:
            i, answer = self.index[prompt]
            good = i < params["skill"] + (2 if HINT in context else 0)
            out.append([f"#### {answer}" if good and (temperature[j] == 0 or j % 2 == 0)
                        else "#### 99999" for j in range(n)])
        return out


def test_hook_scores_best_context_original_prompt_ood_and_2x2():
    cfg = EvaluationConfig(every=5, num_examples=8, k=4, kl=False, two_by_two=True,
                           ood_tasks=("arithmetic-ood-test",))
    hook = EvaluationHook(cfg, ood={"arithmetic-ood-test": OodArithmetic(original_prompt="OOD.")})
    task = ArithmeticTask()
    gen = StubGenerator([task, hook.ood["arithmetic-ood-test"]], 8)
    out = hook.run(gen, {"skill": 4}, {"skill": 1}, task, [f"Be exact. {HINT}", "Be exact."],
                   "Be exact.")
    assert out["eval/pass@1"] == 6 / 8 and out["eval/pass@1_original"] == 4 / 8
    assert out["eval/mean@4"] == 3 / 8 and out["eval/mean@4_original"] == 2 / 8
    # OOD sets get their own original prompt, never the evolved context (its hint adds 2).
    assert out["eval/ood/arithmetic-ood-test/pass@1"] == 4 / 8
    assert out["eval/ood/arithmetic-ood-test/mean@4"] == 2 / 8
    assert {k: v for k, v in out.items() if k.startswith("eval/2x2/")} == {
        "eval/2x2/base/original": 1 / 8, "eval/2x2/base/evolved": 3 / 8,
        "eval/2x2/trained/original": 4 / 8, "eval/2x2/trained/evolved": 6 / 8}
    ood_prompts = {ex.prompt for ex in hook.examples(hook.ood["arithmetic-ood-test"])}
    assert {ctx for _, pairs, _, _ in gen.calls for ctx, p in pairs if p in ood_prompts} == {"OOD."}
    assert len(gen.calls) == 2  # the trained weights' greedy and sampled draws together; the base's
    assert gen.calls[0][2:] == (5, [0.0] + [0.6] * 4)
    assert out["eval/pass@1_max"] == 6 / 8
    assert hook.due(10) and not hook.due(11)


def test_hook_problems_record_holds_per_example_scores_that_average_to_the_logged_ones():
    cfg = EvaluationConfig(num_examples=8, k=4, kl=False, two_by_two=True,
                           ood_tasks=("arithmetic-ood-test",))
    hook = EvaluationHook(cfg, ood={"arithmetic-ood-test": OodArithmetic(original_prompt="OOD.")})
    task = ArithmeticTask()
    gen = StubGenerator([task, hook.ood["arithmetic-ood-test"]], 8)
    out = hook.run(gen, {"skill": 4}, {"skill": 1}, task, [f"Be exact. {HINT}"], "Be exact.")
    rec = json.loads(json.dumps(hook.problems))  # what eval_problems.jsonl holds
    assert rec["example_ids"] == {t.name: [ex.id for ex in hook.examples(t)]
                                  for t in (task, hook.ood["arithmetic-ood-test"])}
    assert set(rec["scores"]) == {k for k in out if not k.endswith("_max")}
    for key, scores in rec["scores"].items():
        assert np.mean(scores) == out[key], key
    assert np.shape(rec["scores"]["eval/mean@4"]) == (8, 4)
    assert rec["scores"]["eval/pass@1"] == [1.0] * 6 + [0.0] * 2  # examples 0-5 solved greedily
    assert np.shape(rec["scores"]["eval/2x2/base/original"]) == (8,)


def test_hook_keeps_running_maxima_across_evaluations_and_checkpoints():
    """Also: with no original_prompt the task's own is used (rl mode: it is the only context)."""
    cfg = EvaluationConfig(num_examples=8, k=2, kl=False)
    task = ArithmeticTask()
    hook = EvaluationHook(cfg)
    gen = StubGenerator([task], 8)
    hook.run(gen, {"skill": 5}, None, task, [task.original_prompt])
    restored = EvaluationHook(cfg)
    restored.load_state(hook.state())
    out = restored.run(gen, {"skill": 2}, None, task, [task.original_prompt])
    assert out["eval/pass@1"] == 2 / 8 and out["eval/pass@1_max"] == 5 / 8
    assert out["eval/mean@2_max"] == pytest.approx(5 / 16)
    assert len(gen.calls[-1][1]) == 8  # rl mode: the best context IS the original; no repeats


def test_hook_kl_needs_a_token_level_generator_and_config_rejects_unknown_ood_task():
    task = ArithmeticTask()
    hook = EvaluationHook(EvaluationConfig(num_examples=2, k=1, greedy=False))
    with pytest.raises(TypeError, match="kl needs a Generator"):
        hook.run(StubGenerator([task], 2), {"skill": 1}, {"skill": 1}, task, ["x"], "x")
    with pytest.raises(ConfigError, match="unknown ood task"):
        EvaluationConfig(ood_tasks=("no-such-task",))
    assert EvaluationConfig(ood_tasks=("rg:maze",)).ood_tasks == ("rg:maze",)  # a family member


# -- the hook's KL on the real sampler ----------------------------------------------------
def _kl_setup(kl_samples=1, kl_contexts=("best", "original")):
    tok = ByteChatTokenizer()
    cfg = tiny("llama", vocab_size=ByteChatTokenizer.vocab_size)
    sampler = Sampler(init_model(cfg, seed=3), tok,
                      SamplingConfig(max_new_tokens=8, prompt_buckets=(128, 256)))
    base = nnx.state(init_model(cfg, seed=4))
    hook = EvaluationHook(EvaluationConfig(num_examples=3, k=1, greedy=False, max_new_tokens=8,
                                           seed=5, kl_samples=kl_samples, kl_contexts=kl_contexts))
    return sampler, base, hook


def kl_draw_ids(ex, context, n):
    """The hook's draw ids of an example's ``n`` KL samples under ``context``."""
    first = zlib.crc32(f"arithmetic\0{ex.id}\0{context}\0kl".encode()) % (2**31 // n)
    return first * n + np.arange(n)


def test_hook_kl_is_the_exact_kl_of_the_policys_own_temperature_1_samples_per_completion():
    sampler, base, hook = _kl_setup(kl_samples=2)
    task = ArithmeticTask()
    out = hook.run(sampler, sampler.params, base, task, ["Be exact."], "Be exact.")
    kl, tokens = (np.array(hook.problems[f]["eval/kl_to_base"]) for f in ("kl", "kl_tokens"))
    assert kl.shape == tokens.shape == (3, 2)
    examples = hook.examples(task)
    prompts = sampler.encode([("Be exact.", ex.prompt) for ex in examples])
    # the KL samples alone: each row draws by its own id, whatever else the hook's request held
    samples = sampler.generate(sampler.params, prompts, n=2, seed=5, temperature=1.0, top_p=1.0,
                               top_k=0, max_new_tokens=8,
                               prompt_ids=np.stack([kl_draw_ids(ex, "Be exact.", 2) for ex in examples]))
    rows = samples_to_rows(samples)
    assert rows.loss_mask.sum() == samples.mask.sum() == tokens.sum()
    want, want_rows = numpy_kl(nnx.merge(sampler.graphdef, sampler.params),
                               nnx.merge(sampler.graphdef, base), rows)
    np.testing.assert_allclose(kl.ravel(), want_rows, rtol=1e-4)
    np.testing.assert_allclose(out["eval/kl_to_base"], want, rtol=1e-4)
    assert out["eval/kl_to_base_original"] == out["eval/kl_to_base"]  # rl mode: one prompt
    same = hook.run(sampler, sampler.params, sampler.params, task, ["Be exact."], "Be exact.")
    np.testing.assert_allclose(same["eval/kl_to_base"], 0.0, atol=1e-6)


def test_hook_measures_kl_under_the_evaluated_context_and_the_original_prompt():
    sampler, base, hook = _kl_setup(kl_samples=2)
    task = ArithmeticTask()
    out = hook.run(sampler, sampler.params, base, task, ["Evolved: be exact."], "Be exact.")
    assert out["eval/kl_to_base"] != out["eval/kl_to_base_original"]
    for key in ("eval/kl_to_base", "eval/kl_to_base_original"):  # the record recomputes them
        assert kl_token_mean(hook.problems["kl"][key], hook.problems["kl_tokens"][key]) == \
            pytest.approx(out[key], rel=1e-12)
    only = _kl_setup(kl_samples=2, kl_contexts=("original",))[2]
    alone = only.run(sampler, sampler.params, base, task, ["Evolved: be exact."], "Be exact.")
    assert "eval/kl_to_base" not in alone  # and the original prompt's samples are the same ones
    assert alone["eval/kl_to_base_original"] == pytest.approx(out["eval/kl_to_base_original"], rel=1e-5)
    with pytest.raises(ConfigError, match="kl_contexts"):
        EvaluationConfig(kl_contexts=("best", "best"))


def test_hook_samples_each_prompt_once_per_weights_with_its_greedy_tempered_and_kl_samples():
    sampler, base, _ = _kl_setup()
    hook = EvaluationHook(EvaluationConfig(num_examples=3, k=2, max_new_tokens=8, kl_samples=2,
                                           two_by_two=True))
    calls = []
    generate = sampler.generate

    def recording(params, prompts, n=1, seed=0, temperature=None, *args, **kw):
        calls.append((params is base, prompts.num_prompts, n, list(np.broadcast_to(temperature, (n,)))))
        return generate(params, prompts, n, seed, temperature, *args, **kw)

    sampler.generate = recording
    out = hook.run(sampler, sampler.params, base, ArithmeticTask(), ["Evolved: be exact."], "Be exact.")
    # 3 examples x 2 prompts: one request of the trained weights (greedy, k = 2 at T 0.6, 2 KL
    # samples at T 1 each), one of the base weights' greedy samples for the 2x2
    assert calls == [(False, 6, 5, [0.0, 0.6, 0.6, 1.0, 1.0]), (True, 6, 1, [0.0])]
    assert {"eval/kl_to_base", "eval/kl_to_base_original", "eval/2x2/base/evolved"} <= set(out)
    hook.run(sampler, sampler.params, base, ArithmeticTask(), ["Evolved: be exact."], "Be exact.")
    assert calls[2:] == [calls[0]]  # later evaluations: the base's greedy samples are remembered


def test_hook_grades_the_base_weights_greedily_once_per_example_and_context():
    """The base weights never change: later evaluations grade them only on new contexts, and in
    gepa mode (the policy is the base) greedy scores are reused too; sampled ones never are."""
    cfg = EvaluationConfig(num_examples=8, k=2, kl=False, two_by_two=True)
    task = ArithmeticTask()
    hook = EvaluationHook(cfg)
    gen = StubGenerator([task], 8)
    base = {"skill": 1}
    first = hook.run(gen, {"skill": 4}, base, task, [f"A. {HINT}"], "A.")
    assert [c[0] for c in gen.calls] == [4, 1]
    again = hook.run(gen, {"skill": 4}, base, task, [f"A. {HINT}"], "A.")
    assert [c[0] for c in gen.calls[2:]] == [4]  # sampled and greedy of the trained weights
    assert again == first
    hook.run(gen, {"skill": 4}, base, task, [f"B. {HINT}"], "A.")
    assert {ctx for ctx, _ in gen.calls[-1][1]} == {f"B. {HINT}"} and gen.calls[-1][0] == 1
    gepa = hook.run(gen, base, base, task, [f"B. {HINT}"], "A.")
    assert [(c[0], c[3]) for c in gen.calls[-1:]] == [(1, [0.6, 0.6])]  # only sampled draws
    assert gepa["eval/2x2/base/evolved"] == gepa["eval/pass@1"] == 3 / 8
    fresh = {"skill": 1}  # a new base-weights object: its scores are not assumed
    hook.run(gen, {"skill": 4}, fresh, task, [f"A. {HINT}"], "A.")
    assert gen.calls[-1][0] == 1 and len(gen.calls[-1][1]) == 16


def test_hook_names_each_example_and_contexts_draws_the_same_in_every_mode():
    """rl mode asks for the original prompt alone, fst for the evolved context beside it: the
    (example, original prompt) pairs keep their prompt ids, so both modes sample them alike."""
    cfg = EvaluationConfig(num_examples=8, k=2, kl=False, greedy=False)
    task = ArithmeticTask()
    rl, fst = EvaluationHook(cfg), EvaluationHook(cfg)
    gen_rl, gen_fst = StubGenerator([task], 8), StubGenerator([task], 8)
    rl.run(gen_rl, {"skill": 3}, None, task, ["A."], "A.")
    fst.run(gen_fst, {"skill": 3}, None, task, [f"A. {HINT}"], "A.")
    original = {pair: i for pair, i in gen_fst.ids.items() if pair[0] == "A."}
    assert original == gen_rl.ids and len(original) == 8
    assert len(set(gen_fst.ids.values())) == 16  # distinct pairs, distinct draws
