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
