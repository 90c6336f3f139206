"""User datasets: JSONL files and a tensorflow-datasets dataset prepared locally, with verifiers."""

import json

import pytest

from fst_jax.config import ConfigError
from fst_jax.tasks import make_task

ROWS = [{"q": f"What is {i} squared?", "a": str(i * i), "uid": f"r{i}"} for i in range(40)]


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_jsonl_round_trips_records_with_named_fields(tmp_path):
    path = _write(tmp_path / "train.jsonl", ROWS[:10])
    _write(tmp_path / "test.jsonl", ROWS[10:15])
    task = make_task("jsonl", path=str(tmp_path / "{split}.jsonl"), prompt_field="q", answer_field="a", id_field="uid")
    train = task.examples("train", 10, seed=0)
    assert path.endswith("train.jsonl")
    assert sorted((e.prompt, e.answer, e.id) for e in train) == sorted((r["q"], r["a"], f"jsonl-{r['uid']}") for r in ROWS[:10])
    assert {e.prompt for e in task.examples("test", 5)} == {r["q"] for r in ROWS[10:15]}
    assert [e.id for e in task.examples("train", 4, seed=1)] == [e.id for e in task.examples("train", 4, seed=1)]


def test_jsonl_single_file_splits_by_prompt_hash_without_overlap(tmp_path):
    task = make_task("jsonl", path=_write(tmp_path / "all.jsonl", ROWS), prompt_field="q", answer_field="a",
                     test_fraction=0.3)
    n_test = len(task._records("test"))
    train, test = task.examples("train", 40 - n_test), task.examples("test", n_test)
    assert 0 < n_test < 40 and not {e.prompt for e in train} & {e.prompt for e in test}
    with pytest.raises(ValueError, match="the split has"):
        task.examples("test", n_test + 1)


def test_jsonl_reward_uses_the_named_verifier_and_gives_the_reference(tmp_path):
    task = make_task("jsonl", path=_write(tmp_path / "d.jsonl", ROWS), prompt_field="q", answer_field="a",
                     verifier="numeric")
    ex = task.examples("train", 1)[0]
    assert task.reward(ex, f"It is <answer>{ex.answer}.0</answer>")[0] == 1.0
    score, feedback = task.reward(ex, "<answer>-1</answer>")
    assert score == 0.0 and f"The correct answer is {ex.answer}." in feedback


def test_jsonl_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        make_task("jsonl", path=str(tmp_path / "missing.jsonl")).examples("train", 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "1"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        make_task("jsonl", path=str(bad), test_path=str(bad)).examples("train", 1)
    with pytest.raises(ConfigError, match="verifier"):
        make_task("jsonl", path=str(bad), verifier="fuzzy")


def test_tfds_dataset_prepared_in_a_local_data_dir_round_trips(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinySquares(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"question": tfds.features.Text(), "answer": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(ROWS[:12]), "test": self._generate_examples(ROWS[12:16])}

        def _generate_examples(self, rows):
            for r in rows:
                yield r["uid"], {"question": r["q"], "answer": r["a"]}

    TinySquares(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    task = make_task("tfds", dataset="tiny_squares", data_dir=str(tmp_path), prompt_field="question",
                     answer_field="answer", verifier="exact")
    train = task.examples("train", 12, seed=0)
    assert sorted((e.prompt, e.answer) for e in train) == sorted((r["q"], r["a"]) for r in ROWS[:12])
    assert {e.prompt for e in task.examples("test", 4)} == {r["q"] for r in ROWS[12:16]}
    assert task.reward(train[0], f"<answer>{train[0].answer}</answer>")[0] == 1.0
