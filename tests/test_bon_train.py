"""`minirlhf bon` end to end on tiny checkpoints: its table, resuming, and bad input in one line."""

import json

import numpy as np
import pytest

from minirlhf import bon as bon_math
from minirlhf import cli
from minirlhf.train import bon as bon_stage

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--batch-size", "4"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny policy (context 48), a reward model from it, one of context 24, and prompts."""
    root = tmp_path_factory.mktemp("bon")
    (root / "corpus.txt").write_text("Sweet love, good night! O villain, villain!\n" * 40)
    for name, block in (("pre", "48"), ("short", "24")):
        assert cli.main(["pretrain", "--data", str(root / "corpus.txt"), "--out-dir", str(root / name),
                         "--max-steps", "2", "--eval-interval", "2", "--sample-interval", "0",
                         "--block-size", block, "--quiet", *TINY]) == 0
    prefs = write_jsonl(root / "prefs.jsonl", [{"prompt": f"Speech {i}:", "chosen": "sweet love",
                                                "rejected": "foul hate"} for i in range(8)])
    for name, init in (("rm", "pre"), ("rm_short", "short")):
        assert cli.main(["reward", "--data", prefs, "--init", str(root / init / "ckpt.npz"),
                         "--out-dir", str(root / name), "--max-steps", "1", "--quiet"]) == 0
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Speech {i}:"} for i in range(5)])
    return {"root": root, "init": str(root / "pre" / "ckpt.npz"), "prompts": prompts,
            "rm": str(root / "rm" / "ckpt.npz"), "rm_short": str(root / "rm_short" / "ckpt.npz")}


def argv(work, out, *more):
    return ["bon", "--init", work["init"], "--reward-model", work["rm"], "--prompts", work["prompts"],
            "--n", "1,2,4,8", "--prompts-per-step", "2", "--max-new-tokens", "6",
            "--out-dir", str(out), "--quiet", *more]


def test_bon_writes_reward_gold_and_kl_for_each_n(work, tmp_path):
    assert cli.main(argv(work, tmp_path)) == 0
    table = read_jsonl(tmp_path / "bon.jsonl")
    assert [r["n"] for r in table] == [1, 2, 4, 8]
    for r in table:
        assert r["prompts"] == 5
        assert r["kl_analytic"] == pytest.approx(bon_math.analytic_kl(r["n"]), abs=1e-15)
        assert r["kl"] <= r["kl_analytic"] + 1e-12          # ties only lower it
        assert {"reward", "reward_se", "gold", "gold_se", "kl_se"} <= set(r)
    assert table[0]["kl"] == pytest.approx(0, abs=1e-12)     # best of 1 is the reference
    rewards = [r["reward"] for r in table]
    assert rewards == sorted(rewards)                          # nested: more samples, never worse
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]            # 5 prompts, 2 a step
    assert len(rows[0]["reward@8"]) == 2 and len(rows[0]["replies"]) == 2
    # again in the same folder: finished, nothing to do, the same table
    assert cli.main(argv(work, tmp_path)) == 0
    assert read_jsonl(tmp_path / "bon.jsonl") == table


def test_bon_stopped_half_way_goes_on_to_the_same_numbers(work, tmp_path, monkeypatch):
    assert cli.main(argv(work, tmp_path / "whole")) == 0
    real_step, calls = bon_stage._step, []

    def stop_at_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(bon_stage, "_step", stop_at_the_second)
    assert cli.main(argv(work, tmp_path / "parts")) == 130
    assert len(read_jsonl(tmp_path / "parts" / "metrics.jsonl")) == 1
    monkeypatch.setattr(bon_stage, "_step", real_step)
    assert cli.main(argv(work, tmp_path / "parts")) == 0
    assert (read_jsonl(tmp_path / "parts" / "bon.jsonl")
            == read_jsonl(tmp_path / "whole" / "bon.jsonl"))


def run_error(capsys, args):
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


@pytest.mark.parametrize("n", ["0,2", "1,a", "2.5", "", "-4"])
def test_bad_n_is_one_line(work, tmp_path, capsys, n):
    err = run_error(capsys, argv(work, tmp_path, "--n", n))
    assert "n must be comma-separated integers >= 1" in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_repeated_n_is_one_line(work, tmp_path, capsys):
    assert "repeated" in run_error(capsys, argv(work, tmp_path, "--n", "2,2"))


def test_a_reward_model_with_a_shorter_context_is_refused_at_start(work, tmp_path, capsys):
    args = argv(work, tmp_path)
    args[args.index("--reward-model") + 1] = work["rm_short"]
    err = run_error(capsys, args)
    assert "reads 24 tokens, fewer than the policy's context of 48" in err
    assert not (tmp_path / "ckpt.npz").exists()


def test_parse_ns_sorts_and_accepts_spaces():
    assert bon_stage.parse_ns(" 4, 1,16 ") == (1, 4, 16)
    assert np.array_equal(bon_stage.parse_ns("64"), [64])
