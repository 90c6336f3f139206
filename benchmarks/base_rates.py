"""Base rates of the bundled SmolLM2-135M-Instruct on every registered task, with its seed context.

For each task: ``--n`` test problems (seed 0), the task's ``seed_context`` as the system prompt,
greedy accuracy (one sample at temperature 0) and mean@4 (four samples at temperature 1, the
mean score), and greedy accuracy with the task's ``original_prompt`` (mode rl's prompt). Scores use the task's own reward (0/1). A task has headroom for learning at small
scale when its rates sit between about 5% and 60%. One JSON line per task goes to
``<out>.jsonl`` as it finishes (a stopped run keeps its tasks); the end writes ``<out>.json``
and a markdown table ``<out>.md``.

    nice -n 10 python benchmarks/base_rates.py [--tasks arithmetic,codeio,rg:path_star] [--n 64]
        [--max-new-tokens 256] [--task-options '{"max_terms": 3}'] [--skip-measured]
        [--out benchmarks/results_base_rates] [--tables-only]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fst_jax.sampling import Sampler, SamplingConfig  # noqa: E402
from fst_jax.tasks import TASKS, make_task, safe_reward  # noqa: E402

USER_DATA_TASKS = ("jsonl", "tfds")  # need a user's data file: not measurable here


def generate(sampler, pairs, n, temperature, seed, max_new_tokens):
    """Completions for ``pairs`` in order; requests run sorted by prompt length so each chunk pads
    to a similar bucket (codeio-style prompts vary from 200 to 3000 tokens)."""
    lengths = [sum(map(len, sampler.tokenizer.encode(c, t))) for c, t in pairs]
    order = sorted(range(len(pairs)), key=lambda i: lengths[i])
    texts = sampler.generate_text(sampler.params, [pairs[i] for i in order], n=n, seed=seed, temperature=temperature,
                                  max_new_tokens=max_new_tokens)
    out = [None] * len(pairs)
    for i, t in zip(order, texts):
        out[i] = t
    return out


def measure(sampler, name: str, n: int, max_new_tokens: int, options: dict, label: str) -> dict:
    task = make_task(name, **options)
    examples = task.examples("test", n, seed=0)
    pairs = [(task.seed_context, ex.prompt) for ex in examples]
    start = time.perf_counter()
    greedy = generate(sampler, pairs, 1, 0.0, 0, max_new_tokens)
    sampled = generate(sampler, pairs, 4, 1.0, 1, max_new_tokens)
    original = generate(sampler, [(task.original_prompt, ex.prompt) for ex in examples], 1, 0.0, 0, max_new_tokens)
    g = [safe_reward(task, ex, outs[0])[0] for ex, outs in zip(examples, greedy)]
    s = [sum(safe_reward(task, ex, o)[0] for o in outs) / len(outs) for ex, outs in zip(examples, sampled)]
    o = [safe_reward(task, ex, outs[0])[0] for ex, outs in zip(examples, original)]
    return {"task": label, "n": n, "distinct": len({ex.prompt for ex in examples}), "greedy_accuracy": sum(g) / n,
            "mean_at_4": sum(s) / n, "greedy_original_prompt": sum(o) / n,
            "any_of_4": sum(x > 0 for x in s) / n, "max_new_tokens": max_new_tokens,
            "seconds": round(time.perf_counter() - start, 1),
            "example_greedy": {"prompt_tail": examples[0].prompt[-200:], "completion": greedy[0][0][:400],
                               "feedback": safe_reward(task, examples[0], greedy[0][0])[1][:400]}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_tasks = [t for t in sorted(TASKS) if t not in USER_DATA_TASKS]
    parser.add_argument("--tasks", default=",".join(default_tasks))
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-prompts-per-batch", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results_base_rates")
    parser.add_argument("--tables-only", action="store_true", help="rewrite .json/.md from .jsonl, measure nothing")
    parser.add_argument("--task-options", default="{}",
                        help="JSON options for the tasks (e.g. a generator's difficulty); rows are "
                             "labelled '<task> <options>'")
    parser.add_argument("--skip-measured", action="store_true",
                        help="leave out tasks that <out>.jsonl already has (a stopped run continues)")
    args = parser.parse_args()
    if args.tables_only:
        write_tables(args.out)
        return
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, max_prompts_per_batch=args.max_prompts_per_batch,
                            prompt_buckets=(128, 256, 512, 1024, 2048, 4096))
    sampler = Sampler.load("smollm2-135m-instruct", config)
    measured = set()
    if args.skip_measured and os.path.exists(args.out + ".jsonl"):
        with open(args.out + ".jsonl") as f:
            measured = {json.loads(line)["task"] for line in f if line.strip()}
    options = json.loads(args.task_options)
    for name in args.tasks.split(","):
        label = f"{name} {json.dumps(options, sort_keys=True)}" if options else name
        if label in measured:
            continue
        try:
            row = measure(sampler, name, args.n, args.max_new_tokens, options, label)
        except Exception as e:  # one broken task must not lose the others' numbers
            print(json.dumps({"task": name, "error": f"{type(e).__name__}: {e}"}), flush=True)
            continue
        print(json.dumps(row), flush=True)
        with open(args.out + ".jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    write_tables(args.out)


def write_tables(out: str) -> None:
    """``<out>.json`` and ``<out>.md`` from every row in ``<out>.jsonl`` (a task measured again
    replaces its earlier row), so a run can be completed by later ``--tasks`` runs."""
    by_task = {}
    with open(out + ".jsonl") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_task[row["task"]] = row
    rows = list(by_task.values())
    with open(out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["| task | greedy accuracy | mean@4 (T=1) | any of 4 | greedy, original prompt | headroom (5-60%) "
             "| max new tokens | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = "yes" if 0.05 <= max(r["greedy_accuracy"], r["mean_at_4"]) and min(r["greedy_accuracy"], r["mean_at_4"]) <= 0.60 else "no"
        original = f"{r['greedy_original_prompt']:.3f}" if "greedy_original_prompt" in r else "not measured"
        lines.append(f"| {r['task']} | {r['greedy_accuracy']:.3f} | {r['mean_at_4']:.3f} | {r['any_of_4']:.3f} | {original} | {head} "
                     f"| {r['max_new_tokens']} | {r['seconds']:.0f} |")
    settings = sorted({(r["n"], r["max_new_tokens"]) for r in rows})
    note = (f"\nSmolLM2-135M-Instruct (bundled, fp32, CPU), test problems (seed 0) per task as (n, max new "
            f"tokens) = {settings}, each task's seed context (task-agnostic).\n")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n" + note)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
