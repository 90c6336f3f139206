"""Reports: what a set of run folders shows, with its uncertainty, and every figure.

``curves``: running max and mean, steps to a level, the ScaleRL sigmoid fit; ``figures``: every
figure, in one style; ``comparison``: a comparison's per-seed report (``summary.md``, the 2x2,
fits, KL at matched reward, the GEPA rounds); ``evidence``: its headline quantities and
between-mode differences across seeds, with paired intervals (``stats``: the two-way bootstrap);
``plasticity``: the plasticity probe's report. Reports read run folders (``fst_jax.runs``) and
the jobs' configs; the jobs (``fst_jax.jobs``) call them.
"""
