"""`minirlhf grpo` end to end on the tiny files of test_train, its TRL metrics, and the settings it
refuses before any work."""

import numpy as np
import pytest

from minirlhf import cli
from minirlhf.checkpoint import load_model
from minirlhf.model import GPT

from test_train import read_metrics, run_error, workdir  # noqa: F401  (workdir is a fixture)

TRL_METRICS = {"loss", "reward", "reward_std", "frac_reward_zero_std", "entropy",
               "completions/mean_length", "completions/clipped_ratio", "clip_ratio/low_mean",
               "clip_ratio/high_mean", "clip_ratio/region_mean"}


@pytest.fixture
def gold(tmp_path):
    (tmp_path / "gold.py").write_text("def reward(prompt, completion):\n"
                                      "    return float(completion.count('e'))\n")
    return f"{tmp_path / 'gold.py'}:reward"


def grpo_args(workdir, gold, out, *extra):
    return ["grpo", "--prompts", workdir["prompts"], "--init", workdir["pre"], "--reward-fn", gold,
            "--out-dir", str(out), "--prompts-per-step", "2", "--num-generations", "3",
            "--max-new-tokens", "5", "--quiet", *extra]


def test_grpo_logs_trls_metrics_and_writes_a_policy(workdir, gold, tmp_path):
    assert cli.main(grpo_args(workdir, gold, tmp_path, "--max-steps", "2")) == 0
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert TRL_METRICS <= set(rows[0]) and "kl" not in rows[0]          # β = 0: no reference
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert 0 <= rows[0]["completions/clipped_ratio"] <= 1
    assert rows[0]["completions/mean_length"] <= 6
    assert isinstance(load_model(tmp_path / "ckpt.npz"), GPT)


def test_grpo_with_beta_several_iterations_and_the_variants_runs(workdir, gold, tmp_path):
    """μ = 2 reuses each generation batch for two steps (the second one off-policy), with k3."""
    assert cli.main(grpo_args(workdir, gold, tmp_path, "--max-steps", "4", "--num-iterations", "2",
                              "--beta", "0.1", "--loss-type", "dr_grpo", "--scale-rewards", "none",
                              "--epsilon-high", "0.28", "--mask-truncated-completions",
                              "--lr", "1e-2")) == 0
    rows = read_metrics(tmp_path)
    assert len(rows) == 4 and "kl" in rows[0]
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-6)                  # step 1 samples p_ref
    assert rows[0]["reward"] == rows[1]["reward"]                       # one batch, two steps
    assert rows[0]["clip_ratio/region_mean"] == 0                       # ρ = 1 on the first step


@pytest.mark.parametrize("extra, message", [
    (["--num-generations", "1"], "needs 2 or more samples per prompt (num_generations"),
    (["--beta", "-0.1"], "beta must be >= 0"),
    (["--num-iterations", "0"], "num_iterations must be at least 1"),
    (["--epsilon-low", "1.5"], "epsilon_low"),
])
def test_grpo_refuses_impossible_settings_before_any_work(workdir, gold, tmp_path, capsys, extra,
                                                          message):
    err = run_error(capsys, grpo_args(workdir, gold, tmp_path / "out", *extra))
    assert message in err
    assert not (tmp_path / "out").exists()


def test_grpo_refuses_an_unknown_loss_type(workdir, gold, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(grpo_args(workdir, gold, tmp_path, "--loss-type", "gspo"))
    assert "invalid choice: 'gspo'" in capsys.readouterr().err
