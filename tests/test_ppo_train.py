"""`minirlhf ppo` end to end on the tiny files of test_train: it logs TRL's PPO metrics, saves a
policy and a value model, starts on-policy (ρ = 1), and refuses bad input with one line."""

from dataclasses import replace

import numpy as np
import pytest
from test_train import read_metrics, run_error, workdir  # noqa: F401  (workdir: a fixture)

from minirlhf import cli
from minirlhf.checkpoint import load_checkpoint, load_model, save_checkpoint
from minirlhf.model import GPT, RewardModel, ValueModel
from minirlhf.train.ppo import PPOConfig, adaptive_beta, make_value_model
from minirlhf.train.rollout import Rewarder
from minirlhf.tokenizer import ByteTokenizer

METRICS = {"objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
           "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
           "loss/value_avg", "val/clipfrac_avg", "val/ratio"}
SMALL = ["--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "6", "--quiet"]


def reward_file(tmp_path, body="return float(completion.count('e'))"):
    (tmp_path / "gold.py").write_text(f"def reward(prompt, completion):\n    {body}\n")
    return f"{tmp_path / 'gold.py'}:reward"


def ppo_args(workdir, tmp_path, *extra):
    return ["ppo", "--prompts", workdir["prompts"], "--init", workdir["pre"],
            "--out-dir", str(tmp_path / "ppo"), *SMALL, *extra]


def test_ppo_logs_trls_metrics_and_saves_policy_and_value_model(workdir, tmp_path):
    code = cli.main(ppo_args(workdir, tmp_path, "--reward-fn", reward_file(tmp_path), "--max-steps", "3",
                             "--ppo-epochs", "2", "--num-minibatches", "2", "--entropy-coef", "0.01"))
    assert code == 0
    rows = read_metrics(tmp_path / "ppo")
    assert len(rows) == 3 and METRICS <= set(rows[0])
    assert all(np.isfinite(r[k]) for r in rows for k in METRICS)
    assert isinstance(load_model(tmp_path / "ppo" / "ckpt.npz"), GPT)
    assert isinstance(load_model(tmp_path / "ppo" / "value.npz"), ValueModel)
    assert load_checkpoint(tmp_path / "ppo" / "value.npz")["step"] == 3


def test_one_epoch_one_minibatch_is_on_policy(workdir, tmp_path):
    """Policy = p_old when the only update is computed: ρ = 1, nothing is clipped, and the first
    step's KL to the reference (the same weights) is 0."""
    assert cli.main(ppo_args(workdir, tmp_path, "--reward-fn", reward_file(tmp_path), "--max-steps", "2",
                             "--ppo-epochs", "1", "--num-minibatches", "1")) == 0
    for row in read_metrics(tmp_path / "ppo"):
        assert row["val/ratio"] == pytest.approx(1.0, abs=1e-6)
        assert row["policy/clipfrac_avg"] == 0 and row["policy/approxkl_avg"] < 1e-12
    first = read_metrics(tmp_path / "ppo")[0]
    assert abs(first["objective/kl"]) < 1e-5
    assert first["objective/rlhf_reward"] == pytest.approx(
        first["objective/scores"] + first["objective/non_score_reward"])


def test_a_policy_with_dropout_is_sampled_and_updated_without_it(workdir, tmp_path):
    """Dropout is off in RL (as TRL): with it on, p_old (the rollout's pass) and p_θ (the update's
    pass) would differ by their dropout masks, and ρ would not be 1 on the first update."""
    model = load_model(workdir["pre"])
    config = replace(model.config, dropout=0.5)
    noisy = GPT(config)
    noisy.load_state_dict(model.state_dict())
    save_checkpoint(tmp_path / "dropout.npz", noisy, config)
    args = ppo_args(workdir, tmp_path, "--reward-fn", reward_file(tmp_path), "--max-steps", "2",
                    "--ppo-epochs", "1", "--num-minibatches", "1")
    args[args.index("--init") + 1] = str(tmp_path / "dropout.npz")
    assert cli.main(args) == 0
    for row in read_metrics(tmp_path / "ppo"):
        assert row["val/ratio"] == pytest.approx(1.0, abs=1e-6) and row["policy/approxkl_avg"] < 1e-12
    assert abs(read_metrics(tmp_path / "ppo")[0]["objective/kl"]) < 1e-5


def test_ppo_ptx_and_missing_eos_penalty_and_adaptive_kl_run(workdir, tmp_path):
    assert cli.main(ppo_args(workdir, tmp_path, "--reward-fn", reward_file(tmp_path, "return 0.0"),
                             "--max-steps", "2", "--ptx-coef", "0.5", "--ptx-data",
                             str(workdir["root"] / "corpus.txt"), "--missing-eos-penalty", "1.0",
                             "--target-kl", "0.01", "--kl-horizon", "100")) == 0
    rows = read_metrics(tmp_path / "ppo")
    for r in rows:                                # reward 0: the score is -1 per unfinished reply
        assert r["objective/scores"] == pytest.approx(-r["eos_missing"])
    assert rows[1]["beta"] == pytest.approx(adaptive_beta(0.1, rows[0]["objective/kl"], 0.01, 100, 4))


def test_adaptive_kl_controller_moves_beta_by_at_most_20_percent_of_n_over_horizon():
    assert adaptive_beta(0.1, 0.02, 0.01, 100, 50) == pytest.approx(0.1 * (1 + 0.2 * 0.5))
    assert adaptive_beta(0.1, 0.011, 0.01, 100, 50) == pytest.approx(0.1 * (1 + 0.1 * 0.5))
    assert adaptive_beta(0.1, 0.0, 0.01, 100, 50) == pytest.approx(0.1 * (1 - 0.2 * 0.5))


def test_the_value_model_starts_as_a_copy_of_the_reward_model(workdir, tmp_path):
    assert cli.main(["reward", "--data", workdir["prefs"], "--init", workdir["pre"], "--out-dir",
                     str(tmp_path / "rm"), "--max-steps", "2", "--quiet"]) == 0
    cfg = PPOConfig(prompts=workdir["prompts"], init=workdir["pre"],
                    reward_model=str(tmp_path / "rm" / "ckpt.npz"))
    policy = load_model(workdir["pre"])
    vm = make_value_model(cfg, policy, Rewarder(cfg, ByteTokenizer()))
    rm = load_model(cfg.reward_model)
    assert isinstance(rm, RewardModel) and isinstance(vm, ValueModel)
    for name, value in rm.state_dict().items():
        np.testing.assert_array_equal(vm.state_dict()[name], value)
    code = cli.main(ppo_args(workdir, tmp_path, "--reward-model", cfg.reward_model, "--max-steps", "1"))
    assert code == 0


def test_ppo_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["ppo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--prompts", "--init", "--reward-model", "--reward-fn", "--ppo-epochs",
                 "--num-minibatches", "--vf-coef", "--entropy-coef", "--target-kl", "--kl-horizon",
                 "--ptx-coef", "--ptx-data", "--missing-eos-penalty", "--cliprange", "--gamma", "--lam"):
        assert flag in out


# ----- bad input ------------------------------------------------------------------------------------


def test_num_minibatches_must_divide_the_rollout(workdir, tmp_path, capsys):
    err = run_error(capsys, ppo_args(workdir, tmp_path, "--reward-fn", "math:hypot",
                                     "--num-minibatches", "3"))
    assert "num_minibatches (3) must divide the rollout batch" in err


def test_a_value_model_that_does_not_fit_the_policy_is_refused_at_start(workdir, tmp_path, capsys):
    assert cli.main(["pretrain", "--data", str(workdir["root"] / "corpus.txt"), "--out-dir",
                     str(tmp_path / "short"), "--max-steps", "1", "--eval-interval", "1",
                     "--sample-interval", "0", "--quiet", "--n-layer", "1", "--n-head", "2",
                     "--n-embd", "16", "--block-size", "24", "--batch-size", "2"]) == 0
    err = run_error(capsys, ppo_args(workdir, tmp_path, "--reward-fn", reward_file(tmp_path),
                                     "--value-model", str(tmp_path / "short" / "ckpt.npz")))
    assert "does not fit the policy" in err and "block_size 24 vs 48" in err
    assert not (tmp_path / "ppo" / "metrics.jsonl").exists()


def test_a_failing_reward_function_is_one_line(workdir, tmp_path, capsys):
    err = run_error(capsys, ppo_args(workdir, tmp_path, "--reward-fn",
                                     reward_file(tmp_path, "raise KeyError('x')")))
    assert "reward function raised KeyError" in err
    assert not (tmp_path / "ppo" / "ckpt.npz").exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_advantages_stop_the_run_naming_step_and_cause(workdir, tmp_path, capsys):
    """A finite but huge score overflows the whitening: the run stops (exit 3, as every diverged
    run), and writes no checkpoint."""
    code = cli.main(ppo_args(workdir, tmp_path, "--reward-fn", reward_file(tmp_path, "return 1e308"),
                             "--max-steps", "2"))
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" not in err
    assert "ppo diverged at step 1: the advantage is nan; no checkpoint was written" in err
    assert not (tmp_path / "ppo" / "ckpt.npz").exists()
