"""Every example runs in smoke mode (a few steps), so none of them rots."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ["autograd.py", "pretrain.py", "sft.py", "reward_model.py", "reinforce_kl.py", "dpo.py",
           "closed_form.py", "which_objective.py", "best_of_n_kl.py"]


def test_every_example_is_listed():
    on_disk = {p.name for p in EXAMPLES.glob("*.py")} - {"toy_task.py"}
    assert on_disk == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_in_smoke_mode(script, tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--smoke"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the example printed nothing"
