"""Reports: what a set of run folders shows, with its uncertainty.

``stats``: the paired two-way (seeds x problems) bootstrap behind every interval;
``evidence``: a comparison's headline quantities and between-mode differences across seeds,
read from the per-problem logs (``eval_problems.jsonl``), with their intervals, figures and
pre-stated flags.
"""
