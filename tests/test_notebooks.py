"""The quickstart notebook runs top to bottom (its code cells, in order, in one namespace)."""

import json
import math
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_gepa_and_applies_three_rl_steps():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)
    assert namespace["result"].budget.proposals == 3
    state, metrics = namespace["state"], namespace["metrics"]
    assert int(state.step) == 3 and int(state.skipped) == 0
    assert math.isfinite(float(metrics["loss"])) and float(metrics["applied"]) == 1.0


def _run_notebook(name: str) -> dict:
    path = NOTEBOOK.parent / name
    namespace: dict = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(path), "exec"), namespace)
    return namespace


def test_tour_notebook_trains_both_channels_and_the_run_folder_notebook_draws_its_figures(
        tmp_path, monkeypatch):
    monkeypatch.setenv("FST_NOTEBOOK_OUT", str(tmp_path / "tour"))
    tour = _run_notebook("fst_tour.ipynb")
    assert tour["summary"]["steps_done"] == tour["job"].steps == 4
    assert sum(r["applied"] for r in tour["steps"]) >= 1  # the coin reward gives RL updates
    assert len(tour["rounds"]) == 2 and tour["rounds"][0]["proposals"] >= 1
    assert set(tour["grid"]["table"]) == {"base/original", "base/evolved", "trained/original",
                                          "trained/evolved"}
    assert {p.name for p in tour["figures"]} >= {"reward.png", "reward_vs_step.png", "contexts.png"}
    monkeypatch.setenv("FST_RUN_DIR", str(tmp_path / "tour"))
    viewer = _run_notebook("run_folder.ipynb")
    assert {p.name for p in viewer["figures"]} >= {"reward.png", "kl_vs_reward.png",
                                                   "reward_vs_step.png"}
    assert "eval/kl_to_base" in viewer["last_eval"]["run"]
