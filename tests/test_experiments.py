"""Every experiment config in experiments/ loads and validates against its job's dataclass."""

from pathlib import Path

import pytest

from fst_jax.config import load_config, save_config
from fst_jax.fast.job import GEPAJob

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
JOBS = {"gepa_": GEPAJob}


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_config_loads_into_its_job_and_round_trips(path, tmp_path):
    job_cls = next((cls for prefix, cls in JOBS.items() if path.name.startswith(prefix)), None)
    assert job_cls is not None, f"{path.name}: no job registered for its name prefix"
    job = load_config(job_cls, path)
    save_config(job, tmp_path / "saved.yaml")
    assert load_config(job_cls, tmp_path / "saved.yaml") == job
