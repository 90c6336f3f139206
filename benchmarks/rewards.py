"""Reward throughput (rewards per second) for the CodeIO tasks, RewardPool vs peers, same run.

For each task (``codeio``: ours; ``rg:codeio``: reasoning-gym's CodeI/O, whose scorer computes a
JSON tree edit distance for wrong answers) a batch of ``--n`` completions is scored: a third
right, a third wrong but well-formed, a third free text. Configurations:
- ``serial``: ``RewardPool(workers=0)``, in this process (what ``safe_reward`` in a loop costs);
- ``pool1``/``pool2``: ``RewardPool`` with 1 or 2 pebble worker processes and a per-call timeout;
- ``stdlib2``: the peer, ``concurrent.futures.ProcessPoolExecutor(2).map(..., chunksize=16)``:
  no per-call timeout and a hanging reward would block the batch.
Pool start-up is excluded (measured separately as ``startup_s``); each figure is the best of
``--repeats``. Prints one JSON object per (task, configuration).

    nice -n 10 python benchmarks/rewards.py [--tasks codeio,rg:codeio] [--n 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

from fst_jax.tasks import make_task, safe_reward
from fst_jax.tasks.rewards import RewardConfig, RewardPool

_TASK = None


def _init(name):
    global _TASK
    _TASK = make_task(name)


def _score(pair):
    return safe_reward(_TASK, *pair)


def completions(task, n):
    examples = task.examples("test", n, seed=0)
    texts = []
    for i, ex in enumerate(examples):
        kind = i % 3
        if kind == 0:
            texts.append(f"Tracing the program step by step.\n<answer>{ex.answer}</answer>")
        elif kind == 1:
            changed = ex.answer.replace("1", "7").replace("a", "b")  # same shape, other values
            wrong = changed if changed != ex.answer else "[0]"
            texts.append(f"I think the result is\n<answer>{wrong}</answer>")
        else:
            texts.append("The function loops over the input and returns something, hard to say exactly.")
    return examples, texts


def best_rate(fn, n, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="codeio,rg:codeio")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in args.tasks.split(","):
        task = make_task(name)
        examples, texts = completions(task, args.n)
        base = {"task": name, "n": args.n, "cpus": os.cpu_count()}
        reference = RewardPool(task).score(examples, texts)
        rate = best_rate(lambda: RewardPool(task).score(examples, texts), args.n, args.repeats)
        print(json.dumps({**base, "config": "serial", "rewards_per_s": round(rate, 1),
                          "mean_score": round(sum(s for s, _ in reference) / args.n, 3)}), flush=True)
        for workers in (1, 2):
            start = time.perf_counter()
            with RewardPool(task, RewardConfig(workers=workers, timeout_s=10.0)) as pool:
                startup = time.perf_counter() - start
                assert pool.score(examples, texts) == reference
                rate = best_rate(lambda: pool.score(examples, texts), args.n, args.repeats)
            print(json.dumps({**base, "config": f"pool{workers}", "rewards_per_s": round(rate, 1),
                              "startup_s": round(startup, 2)}), flush=True)
        ctx = multiprocessing.get_context("forkserver")
        start = time.perf_counter()
        with ProcessPoolExecutor(2, mp_context=ctx, initializer=_init, initargs=(name,)) as ex:
            list(ex.map(_score, [(examples[0], texts[0])] * 2))
            startup = time.perf_counter() - start
            pairs = list(zip(examples, texts))
            rate = best_rate(lambda: list(ex.map(_score, pairs, chunksize=16)), args.n, args.repeats)
        print(json.dumps({**base, "config": "stdlib2", "rewards_per_s": round(rate, 1),
                          "startup_s": round(startup, 2)}), flush=True)


if __name__ == "__main__":
    main()
