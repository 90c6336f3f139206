"""A test task: arithmetic problems whose reward is a deterministic coin of the completion text,
so a tiny random policy's groups have reward variance and every step trains. Run as a script,
it registers the task and runs ``fst_jax.cli`` with the remaining arguments (for tests that
start separate training processes)."""

import sys

from fst_jax.tasks.arithmetic import ArithmeticTask
from fst_jax.tasks.base import TASKS, register_task

NAME = "test_coin_arithmetic"


class CoinArithmetic(ArithmeticTask):
    name = NAME

    def reward(self, example, completion):
        return float((len(completion) + sum(map(ord, completion[:3]))) % 2), "coin"


if NAME not in TASKS:
    register_task(NAME)(CoinArithmetic)

if __name__ == "__main__":
    from fst_jax.cli import main

    sys.exit(main(sys.argv[1:]))
