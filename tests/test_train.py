"""The five commands run end to end on small files made here, and refuse bad input with one line."""

import json

import numpy as np
import pytest

from minirlhf import cli
from minirlhf.checkpoint import load_checkpoint, load_model
from minirlhf.model import GPT, RewardModel

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "48", "--batch-size", "4"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with a tiny corpus, a pretrained tiny GPT, and SFT / preference / prompt files."""
    root = tmp_path_factory.mktemp("train")
    (root / "corpus.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    code = cli.main(["pretrain", "--data", str(root / "corpus.txt"), "--out-dir", str(root / "pre"),
                     "--max-steps", "4", "--eval-interval", "2", "--sample-interval", "0",
                     "--quiet", *TINY])
    assert code == 0
    rng = np.random.default_rng(0)
    words = ["love", "hate", "sweet", "foul", "fair", "night"]
    sft, prefs, prompts = [], [], []
    for i in range(12):
        prompt = f"Speech {i}: " + " ".join(rng.choice(words, 3))
        sft.append({"prompt": prompt, "completion": "sweet love"})
        prefs.append({"prompt": prompt, "chosen": "fair love", "rejected": "foul hate"})
        prompts.append({"prompt": prompt})
    return {"root": root, "pre": str(root / "pre" / "ckpt.npz"),
            "sft": write_jsonl(root / "sft.jsonl", sft),
            "prefs": write_jsonl(root / "prefs.jsonl", prefs),
            "prompts": write_jsonl(root / "prompts.jsonl", prompts)}


def test_pretrain_logs_metrics_and_writes_a_gpt_checkpoint(workdir):
    rows = read_metrics(workdir["root"] / "pre")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert "val_loss" in rows[1] and "val_loss" in rows[3]
    assert isinstance(load_model(workdir["pre"]), GPT)
    assert load_checkpoint(workdir["pre"])["step"] == 4


def test_pretrain_resume_continues_from_the_checkpoint(workdir, tmp_path):
    args = ["pretrain", "--data", str(workdir["root"] / "corpus.txt"), "--out-dir", str(tmp_path),
            "--eval-interval", "100", "--sample-interval", "0", "--ckpt-interval", "2", "--quiet", *TINY]
    assert cli.main([*args, "--max-steps", "4", "--out-dir", str(tmp_path / "straight")]) == 0
    straight = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert cli.main([*args, "--max-steps", "2"]) == 0
    assert cli.main([*args, "--max-steps", "4"]) == 0     # the same folder: goes on at step 3
    resumed = [r["loss"] for r in read_metrics(tmp_path)]
    assert resumed == straight


def test_sft_trains_on_completions_and_lowers_the_loss(workdir, tmp_path):
    code = cli.main(["sft", "--data", workdir["sft"], "--init", workdir["pre"], "--out-dir",
                     str(tmp_path), "--max-steps", "12", "--batch-size", "4", "--lr", "3e-3",
                     "--eval-interval", "6", "--quiet"])
    assert code == 0
    rows = read_metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert isinstance(load_model(tmp_path / "ckpt.npz"), GPT)


def test_reward_model_learns_the_preference(workdir, tmp_path):
    code = cli.main(["reward", "--data", workdir["prefs"], "--init", workdir["pre"], "--out-dir",
                     str(tmp_path), "--max-steps", "15", "--batch-size", "4", "--lr", "3e-3",
                     "--eval-interval", "5", "--quiet"])
    assert code == 0
    rows = read_metrics(tmp_path)
    assert {"loss", "accuracy", "margin", "val_accuracy"} <= set(rows[-1])
    assert rows[-1]["val_accuracy"] == 1.0
    assert isinstance(load_model(tmp_path / "ckpt.npz"), RewardModel)


def test_rl_with_a_reward_function_logs_reward_kl_and_entropy(workdir, tmp_path):
    (tmp_path / "gold.py").write_text("def reward(prompt, completion):\n"
                                      "    return float(completion.count('e'))\n")
    code = cli.main(["rl", "--prompts", workdir["prompts"], "--init", workdir["pre"],
                     "--reward-fn", f"{tmp_path / 'gold.py'}:reward", "--out-dir", str(tmp_path / "rl"),
                     "--max-steps", "3", "--prompts-per-step", "2", "--samples-per-prompt", "2",
                     "--max-new-tokens", "6", "--quiet"])
    assert code == 0
    rows = read_metrics(tmp_path / "rl")
    assert len(rows) == 3
    assert {"reward", "kl", "entropy", "loss"} <= set(rows[0])
    assert abs(rows[0]["kl"]) < 1e-4  # the first step samples from the reference itself


def test_rl_with_a_reward_model(workdir, tmp_path):
    assert cli.main(["reward", "--data", workdir["prefs"], "--init", workdir["pre"], "--out-dir",
                     str(tmp_path / "rm"), "--max-steps", "2", "--quiet"]) == 0
    code = cli.main(["rl", "--prompts", workdir["prompts"], "--init", workdir["pre"],
                     "--reward-model", str(tmp_path / "rm" / "ckpt.npz"), "--out-dir",
                     str(tmp_path / "rl"), "--max-steps", "2", "--prompts-per-step", "2",
                     "--samples-per-prompt", "2", "--max-new-tokens", "5", "--quiet"])
    assert code == 0
    assert len(read_metrics(tmp_path / "rl")) == 2


def test_dpo_logs_trl_metrics_and_starts_at_log_2(workdir, tmp_path):
    code = cli.main(["dpo", "--data", workdir["prefs"], "--init", workdir["pre"], "--out-dir",
                     str(tmp_path), "--max-steps", "6", "--batch-size", "4", "--lr", "3e-3",
                     "--eval-interval", "3", "--quiet"])
    assert code == 0
    rows = read_metrics(tmp_path)
    names = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected"}
    assert names <= set(rows[0])
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy = reference at step 1
    assert rows[-1]["rewards/margins"] > 0


# ----- bad input: one clear line, exit code 2, no checkpoint -------------------------------------


def run_error(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_a_bad_jsonl_line_names_the_file_and_line(workdir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    err = run_error(capsys, ["sft", "--data", str(bad), "--init", workdir["pre"],
                             "--out-dir", str(tmp_path / "out"), "--quiet"])
    assert "bad.jsonl, line 2" in err and "completion" in err
    assert not (tmp_path / "out" / "ckpt.npz").exists()


def test_a_completion_that_cannot_fit_the_context_is_an_error(workdir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p", "completion": "x" * 100}])
    err = run_error(capsys, ["sft", "--data", data, "--init", workdir["pre"], "--quiet",
                             "--out-dir", str(tmp_path / "out")])
    assert "long.jsonl, line 1" in err and "context is 48 tokens" in err


@pytest.mark.parametrize("argv, message", [
    (["dpo", "--beta", "0"], "beta must be positive"),
    (["dpo", "--beta", "-1"], "beta must be positive"),
    (["rl", "--beta", "0"], "beta must be positive"),
    (["sft", "--max-steps", "0"], "max_steps must be at least 1"),
    (["sft", "--lr", "-1"], "lr must be positive"),
])
def test_impossible_settings_are_refused(workdir, capsys, tmp_path, argv, message):
    stage = argv[0]
    data = {"sft": ["--data", workdir["sft"]], "dpo": ["--data", workdir["prefs"]],
            "rl": ["--prompts", workdir["prompts"], "--reward-fn", "math:hypot"]}[stage]
    err = run_error(capsys, [*argv, *data, "--init", workdir["pre"], "--out-dir", str(tmp_path), "--quiet"])
    assert message in err


def test_rl_needs_exactly_one_reward_source(workdir, tmp_path, capsys):
    err = run_error(capsys, ["rl", "--prompts", workdir["prompts"], "--init", workdir["pre"],
                             "--out-dir", str(tmp_path), "--quiet"])
    assert "exactly one of --reward-model" in err


def test_a_reward_function_that_raises_names_the_prompt(workdir, tmp_path, capsys):
    (tmp_path / "bad_reward.py").write_text("def reward(prompt, completion):\n    raise KeyError('x')\n")
    err = run_error(capsys, ["rl", "--prompts", workdir["prompts"], "--init", workdir["pre"],
                             "--reward-fn", f"{tmp_path / 'bad_reward.py'}:reward", "--out-dir",
                             str(tmp_path / "rl"), "--max-new-tokens", "3", "--quiet"])
    assert "reward function raised KeyError" in err and "Speech" in err
    assert not (tmp_path / "rl" / "ckpt.npz").exists()


def test_an_empty_dataset_is_refused(workdir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    err = run_error(capsys, ["dpo", "--data", str(empty), "--init", workdir["pre"], "--quiet",
                             "--out-dir", str(tmp_path / "out")])
    assert "empty.jsonl" in err and "no records" in err


def test_a_missing_or_foreign_checkpoint_is_one_clear_line(workdir, tmp_path, capsys):
    err = run_error(capsys, ["sample", "--ckpt", str(tmp_path / "nope.npz")])
    assert "nope.npz" in err
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a checkpoint at all")
    err = run_error(capsys, ["sample", "--ckpt", str(junk)])
    assert "junk.npz" in err


def test_unknown_options_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sft", "--data", "x.jsonl", "--no-such-option", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_bad_sampling_settings_are_refused(workdir, capsys):
    err = run_error(capsys, ["sample", "--ckpt", workdir["pre"], "--top-k", "0"])
    assert "top_k" in err
    err = run_error(capsys, ["sample", "--ckpt", workdir["pre"], "--temperature", "-1"])
    assert "temperature" in err


def test_sample_prints_a_continuation(workdir, capsys):
    assert cli.main(["sample", "--ckpt", workdir["pre"], "--prompt", "To be", "--max-new-tokens",
                     "5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("To be")
