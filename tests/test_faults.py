"""Runs never lose work (issue 14): every stage resumes bit for bit after Ctrl-C or a crash, a run
holds its folder, divergence stops the run before it reaches a checkpoint, and bad input is one
line before any work. Signals and locks use real processes (`python -m minirlhf`); the equality of
resumed losses is checked in-process for every stage, through the same signal handler."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minirlhf.checkpoint as checkpoint
from minirlhf import cli
from minirlhf.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.train import dpo as dpo_module
from minirlhf.train.common import ConfigError
from minirlhf.train.dpo import DPOConfig, dpo
from minirlhf.train.grpo import GRPOConfig, grpo
from minirlhf.train.ppo import PPOConfig, ppo
from minirlhf.train.pretrain import PretrainConfig, pretrain
from minirlhf.train.reward import RewardConfig, reward
from minirlhf.train.rl import RLConfig, rl
from minirlhf.train.run import DivergenceError, Interrupted, Run
from minirlhf.train.sft import SFTConfig, sft

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(n_layer=1, n_head=2, n_embd=32, block_size=32)
MODEL_ARGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def metrics(folder):
    """The rows of metrics.jsonl without their wall time (the one thing a resume may change)."""
    rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def weights(folder):
    return load_checkpoint(Path(folder) / "ckpt.npz")["model"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny corpus, a tiny pretrained GPT (dropout on, so its RNG must be resumed too), and the
    JSONL files and reward function of the later stages."""
    root = tmp_path_factory.mktemp("faults")
    corpus = root / "corpus.txt"
    corpus.write_text("Now is the winter of our discontent made glorious summer.\n" * 30)
    pretrain(PretrainConfig(data=str(corpus), out_dir=str(root / "pre"), **MODEL, dropout=0.1,
                            batch_size=4, max_steps=2, eval_interval=2, eval_batches=1,
                            sample_interval=0, quiet=True))
    texts = [f"S{i}: {w}" for i, w in enumerate(["love", "hate", "sweet", "foul", "fair", "night"] * 2)]
    sft_rows = [{"prompt": t, "completion": "sweet love"} for t in texts]
    prefs = [{"prompt": t, "chosen": "fair love", "rejected": "foul hate"} for t in texts]
    prompts = [{"prompt": t} for t in texts]
    (root / "score.py").write_text("def score(prompt, completion):\n"
                                   "    return completion.count('e') - 0.1 * len(completion)\n")
    return {"root": root, "corpus": str(corpus), "pre": str(root / "pre" / "ckpt.npz"),
            "sft": write_jsonl(root / "sft.jsonl", sft_rows),
            "prefs": write_jsonl(root / "prefs.jsonl", prefs),
            "prompts": write_jsonl(root / "prompts.jsonl", prompts),
            "score": f"{root / 'score.py'}:score"}


def stage_run(stage, files, out, **over):
    """Run ``stage`` for 6 steps (checkpoints every 2) into ``out`` with tiny settings."""
    common = dict(out_dir=str(out), max_steps=6, ckpt_interval=2, quiet=True)
    if stage == "pretrain":
        cfg = PretrainConfig(data=files["corpus"], **MODEL, dropout=0.1, batch_size=4, warmup_steps=2,
                             eval_interval=3, eval_batches=1, sample_interval=0, **common)
        return pretrain(cfg) if not over else pretrain(PretrainConfig(**{**vars(cfg), **over}))
    cls, fn, extra = {
        "sft": (SFTConfig, sft, dict(data=files["sft"], batch_size=4, warmup_steps=2, eval_interval=3)),
        "reward": (RewardConfig, reward, dict(data=files["prefs"], batch_size=4, warmup_steps=2,
                                              eval_interval=3)),
        "rl": (RLConfig, rl, dict(prompts=files["prompts"], reward_fn=files["score"], prompts_per_step=2,
                                  samples_per_prompt=2, max_new_tokens=6)),
        "dpo": (DPOConfig, dpo, dict(data=files["prefs"], batch_size=4, warmup_steps=2, eval_interval=3)),
        # everything that carries state from step to step is on: the value model, the
        # adaptive β, the ptx windows, and (GRPO) a generation batch that two steps share
        "ppo": (PPOConfig, ppo, dict(prompts=files["prompts"], reward_fn=files["score"], prompts_per_step=2,
                                    samples_per_prompt=2, max_new_tokens=6, ppo_epochs=2,
                                    num_minibatches=2, target_kl=0.01, kl_horizon=100, ptx_coef=0.1,
                                    ptx_data=files["corpus"], ptx_batch_size=2)),
        "grpo": (GRPOConfig, grpo, dict(prompts=files["prompts"], reward_fn=files["score"],
                                      prompts_per_step=2, num_generations=2, max_new_tokens=6,
                                      num_iterations=2, beta=0.1)),
    }[stage]
    return fn(cls(init=files["pre"], **{**extra, **common, **over}))


STAGES = ["pretrain", "sft", "reward", "rl", "dpo", "ppo", "grpo"]


def run_each_straight(stages, stage_run, files):
    """Each stage run without interruption, {stage: (metrics, weights)}: the numbers every resumed
    run must reproduce. ``stage_run(stage, files, folder)`` runs one (each test module has its own)."""
    out = {}
    for stage in stages:
        folder = files["root"] / f"straight_{stage}"
        stage_run(stage, files, folder)
        out[stage] = (metrics(folder), weights(folder))
    return out


@pytest.fixture(scope="module")
def straight(files):
    return run_each_straight(STAGES, stage_run, files)


def stop_at(monkeypatch, step, how):
    """At the end of ``step`` (after it is logged): Ctrl-C (a real SIGINT to this process) or a crash."""
    log = Run.log

    def logging_then_stopping(self, s, row):
        result = log(self, s, row)
        if s == step:
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise RuntimeError("simulated crash")
        return result
    monkeypatch.setattr(Run, "log", logging_then_stopping)


def assert_same_run(folder, reference):
    rows, w = reference
    assert metrics(folder) == rows                       # every step once, every number to the bit
    resumed = weights(folder)
    assert all(np.array_equal(resumed[k], w[k]) for k in w)


# ----- 2. every stage resumes bit for bit -----------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_ctrl_c_then_the_same_command_gives_the_uninterrupted_run_bit_for_bit(stage, files, straight,
                                                                          tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        stop_at(m, 3, "sigint")
        with pytest.raises(Interrupted):
            stage_run(stage, files, tmp_path)
    assert load_checkpoint(tmp_path / "ckpt.npz")["step"] == 3    # the interrupted step was saved
    stage_run(stage, files, tmp_path)
    assert_same_run(tmp_path, straight[stage])


@pytest.mark.parametrize("stage", STAGES)
def test_a_crash_resumes_from_the_last_checkpoint_bit_for_bit(stage, files, straight, tmp_path,
                                                              monkeypatch):
    with monkeypatch.context() as m:
        stop_at(m, 5, "crash")
        with pytest.raises(RuntimeError, match="simulated crash"):
            stage_run(stage, files, tmp_path)
    assert load_checkpoint(tmp_path / "ckpt.npz")["step"] == 4
    assert len(metrics(tmp_path)) == 5                   # step 5 was logged, then lost
    stage_run(stage, files, tmp_path)
    assert_same_run(tmp_path, straight[stage])           # step 5 is in metrics.jsonl once


@pytest.mark.parametrize("stage, key, logged", [("sft", "loss", "loss"),
                                                 ("ppo", "reward", "objective/scores"),
                                                 ("grpo", "reward", "reward")])
def test_a_finished_run_says_so_and_changes_nothing(stage, key, logged, files, straight, capsys):
    folder = files["root"] / f"straight_{stage}"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    result = stage_run(stage, files, folder, quiet=False)
    assert "finished at step 6; nothing to do" in capsys.readouterr().err
    assert result[key] == straight[stage][0][-1][logged]          # the result of the finished run
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}


def test_other_settings_in_the_folder_are_refused_unless_overwrite(files, straight, tmp_path):
    stage_run("sft", files, tmp_path, max_steps=2)
    with pytest.raises(ConfigError, match=r"other settings \(lr=0.0005, not 0.001\).*--overwrite"):
        stage_run("sft", files, tmp_path, max_steps=2, lr=1e-3)
    stage_run("sft", files, tmp_path, max_steps=2, lr=1e-3, overwrite=True)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    assert load_checkpoint(tmp_path / "ckpt.npz")["extra"]["settings"]["lr"] == 1e-3


def test_overwrite_with_a_missing_data_file_keeps_the_old_run(files, tmp_path):
    stage_run("sft", files, tmp_path, max_steps=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}
    with pytest.raises(FileNotFoundError):
        stage_run("sft", files, tmp_path, max_steps=2, data=str(tmp_path / "typo.jsonl"), overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"} == before


def test_a_checkpoint_past_max_steps_is_refused_not_called_finished(files, tmp_path, monkeypatch):
    stop_at(monkeypatch, 5, "crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        stage_run("sft", files, tmp_path)                     # checkpoints at 2 and 4, a crash at 5
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="at step 4, past --max-steps 3"):
        stage_run("sft", files, tmp_path, max_steps=3)
    assert load_checkpoint(tmp_path / "ckpt.npz")["step"] == 4


def test_an_eval_interval_of_0_is_one_line_before_any_work(files, tmp_path, capsys):
    code = cli.main(["sft", "--data", files["sft"], "--init", files["pre"], "--eval-interval", "0",
                     "--out-dir", str(tmp_path), "--quiet"])
    assert code == 2 and "eval_interval must be at least 1" in capsys.readouterr().err
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_a_finished_run_goes_on_when_max_steps_grows(files, straight, tmp_path):
    stage_run("pretrain", files, tmp_path, max_steps=4)
    stage_run("pretrain", files, tmp_path, max_steps=6)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_changed_input_files_are_another_run(files, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(Path(files["sft"]).read_text())
    cfg = dict(data=str(data), init=files["pre"], out_dir=str(tmp_path / "run"), batch_size=4,
               max_steps=2, quiet=True)
    sft(SFTConfig(**cfg))
    data.write_text(Path(files["sft"]).read_text() + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(ConfigError, match="other versions of its inputs"):
        sft(SFTConfig(**cfg))


# ----- real processes: signals, kill -9, locks --------------------------------------------------------

def pretrain_args(files, out, max_steps, *extra):
    return ["pretrain", "--data", files["corpus"], *MODEL_ARGS, "--batch-size", "2",
            "--max-steps", str(max_steps), "--eval-interval", "1000", "--eval-batches", "1",
            "--sample-interval", "0", "--out-dir", str(out), *extra]


def start(args, prelude=None):
    """``python -m minirlhf ARGS`` from the repository root (or ``prelude`` code, then the CLI)."""
    code = (prelude or "") + "\nimport sys\nfrom minirlhf import cli\nsys.exit(cli.main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_rows(folder, n, proc, timeout=60):
    """Wait until ``proc`` has logged at least ``n`` steps."""
    path, t0 = Path(folder) / "metrics.jsonl", time.time()
    while time.time() - t0 < timeout:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("the run logged nothing")


@pytest.fixture(scope="module")
def long_straight(files):
    """An uninterrupted 60-step pretraining run, to compare the killed-and-resumed ones with."""
    out = files["root"] / "long"
    assert cli.main(pretrain_args(files, out, 60, "--quiet")) == 0
    return [r["loss"] for r in metrics(out)]


def test_kill_int_at_a_random_step_a_second_run_is_refused_and_the_rerun_resumes(files, long_straight,
                                                                                 tmp_path, capsys):
    args = pretrain_args(files, tmp_path, 60, "--ckpt-interval", "20")
    proc = start(args)
    wait_for_rows(tmp_path, random.Random(14).randint(2, 15), proc)
    proc.send_signal(signal.SIGSTOP)                 # held at a random step, however fast it runs

    # 3. a second run into the same folder refuses, naming the process that holds it
    assert cli.main(args + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"is in use by process {proc.pid}" in err and len(err.splitlines()) == 1

    proc.send_signal(signal.SIGINT)                  # Ctrl-C: delivered when it goes on
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    stopped = load_checkpoint(tmp_path / "ckpt.npz")["step"]
    assert f"stopped after step {stopped}, saved in" in err
    assert err.strip().endswith("to go on, type: minirlhf " + " ".join(args))   # what to type
    assert len(metrics(tmp_path)) == stopped

    assert cli.main(args + ["--quiet"]) == 0                   # the same command goes on
    assert [r["loss"] for r in metrics(tmp_path)] == long_straight


def test_kill_9_at_a_random_step_loses_nothing_but_the_steps_since_the_checkpoint(files, long_straight,
                                                                               tmp_path, capsys):
    args = pretrain_args(files, tmp_path, 60)
    proc = start(args + ["--ckpt-interval", "1"])            # saving all the time: kills land in saves
    wait_for_rows(tmp_path, random.Random(9).randint(2, 15), proc)
    proc.kill()
    proc.communicate()
    assert cli.main(args) == 0                               # how often to save is no setting
    err = capsys.readouterr().err
    assert f"took over the lock of process {proc.pid}" in err
    assert [r["loss"] for r in metrics(tmp_path)] == long_straight
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_kill_9_during_a_save_leaves_the_last_checkpoint_and_the_orphan_is_cleaned(files, long_straight,
                                                                                tmp_path):
    # the third save writes half a file, then the process kills itself with SIGKILL
    prelude = ("import os, signal, numpy as np\n"
               "real, calls = np.savez, []\n"
               "def savez(f, **arrays):\n"
               "    calls.append(1)\n"
               "    if len(calls) == 3:\n"
               "        f.write(b'PK\\x03\\x04 half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
               "    real(f, **arrays)\n"
               "np.savez = savez\n")
    args = pretrain_args(files, tmp_path, 60, "--quiet")
    proc = start(args + ["--ckpt-interval", "1"], prelude)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(list(tmp_path.glob(".ckpt.npz.*.tmp"))) == 1
    assert load_checkpoint(tmp_path / "ckpt.npz")["step"] == 2
    assert cli.main(args) == 0
    assert not list(tmp_path.glob(".*.tmp"))
    assert [r["loss"] for r in metrics(tmp_path)] == long_straight


def stage_args(stage, files, out):
    """The command line of `stage_run(stage, ...)` for ppo and grpo (checkpoints at every step)."""
    sampling = ["--prompts", files["prompts"], "--reward-fn", files["score"], "--init", files["pre"],
                "--prompts-per-step", "2", "--max-new-tokens", "6", "--max-steps", "6",
                "--ckpt-interval", "1", "--out-dir", str(out), "--quiet"]
    if stage == "ppo":
        return ["ppo", *sampling, "--samples-per-prompt", "2", "--ppo-epochs", "2",
                "--num-minibatches", "2", "--target-kl", "0.01", "--kl-horizon", "100",
                "--ptx-coef", "0.1", "--ptx-data", files["corpus"], "--ptx-batch-size", "2"]
    return ["grpo", *sampling, "--num-generations", "2", "--num-iterations", "2", "--beta", "0.1"]


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_kill_9_of_a_real_ppo_or_grpo_process_then_the_same_command_gives_the_straight_run(
        stage, files, straight, tmp_path):
    # each logged step sleeps a little (numbers unchanged), so that the kill lands mid-run
    prelude = ("import time\nfrom minirlhf.train.run import Run\nlog = Run.log\n"
               "Run.log = lambda self, step, row: (time.sleep(0.3), log(self, step, row))[1]\n")
    args = stage_args(stage, files, tmp_path)
    proc = start(args, prelude)
    wait_for_rows(tmp_path, random.Random(stage).randint(2, 4), proc)
    proc.kill()
    proc.communicate()
    assert len(metrics(tmp_path)) < 6                                  # it was stopped mid-run
    assert cli.main(args) == 0
    assert_same_run(tmp_path, straight[stage])


def test_the_lock_is_released_when_a_run_ends_so_the_next_one_can_go(tmp_path):
    cfg = PretrainConfig(out_dir=str(tmp_path), **MODEL, max_steps=1, quiet=True)
    with Run(cfg, "pretrain"):
        with pytest.raises(ConfigError, match=f"in use by process {os.getpid()}"):
            Run(cfg, "pretrain")
    with Run(cfg, "pretrain"):
        pass


# ----- 1. divergence ----------------------------------------------------------------------------------

def test_lr_1e9_stops_at_the_first_nan_in_one_line_and_writes_no_checkpoint(files, tmp_path):
    """The issue's command: today it exits 0 with a checkpoint whose every weight is NaN."""
    proc = start(pretrain_args(files, tmp_path, 40, "--lr", "1e9", "--warmup-steps", "0", "--quiet"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "pretrain diverged at step" in err and "lower --lr (now 1e+09)" in err
    assert not (tmp_path / "ckpt.npz").exists()


def test_a_nan_loss_at_a_chosen_step_keeps_the_last_good_checkpoint(files, tmp_path, monkeypatch):
    from minirlhf.train import pretrain as pretrain_module
    stage_run("pretrain", files, tmp_path, max_steps=4)           # not finished at 6: resumes at 4
    good = (tmp_path / "ckpt.npz").read_bytes()
    calls = []

    def cross_entropy_nan_at_step_6(*args, **kwargs):
        calls.append(1)
        loss = pretrain_module.F.cross_entropy.__wrapped__(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss
    cross_entropy_nan_at_step_6.__wrapped__ = pretrain_module.F.cross_entropy
    monkeypatch.setattr(pretrain_module.F, "cross_entropy", cross_entropy_nan_at_step_6)
    with pytest.raises(DivergenceError, match=r"pretrain diverged at step 6: the loss is nan; the "
                                              r"checkpoint of step 4 .* is kept"):
        stage_run("pretrain", files, tmp_path, max_steps=8)
    assert (tmp_path / "ckpt.npz").read_bytes() == good
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]   # no NaN row


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("stage", ["sft", "reward", "rl", "dpo", "ppo", "grpo"])
def test_every_stage_stops_on_divergence(stage, files, tmp_path):
    with pytest.raises(DivergenceError, match=f"{stage} diverged at step"):
        stage_run(stage, files, tmp_path, lr=1e30, grad_clip=0.0)
    assert not any(r.get("loss") is None for r in metrics(tmp_path))


def test_nan_weights_are_never_written_and_sample_and_init_refuse_them(files, tmp_path, monkeypatch,
                                                                       capsys):
    model = GPT(GPTConfig(**MODEL, vocab_size=258))
    model.transformer.wte.weight.data[0, 0] = np.nan
    with pytest.raises(CheckpointError, match="not written: the weights transformer.wte.weight are NaN"):
        save_checkpoint(tmp_path / "nan.npz", model, model.config)
    monkeypatch.setattr(checkpoint, "non_finite", lambda state: "")    # as an older minirlhf wrote it
    save_checkpoint(tmp_path / "nan.npz", model, model.config)
    monkeypatch.undo()
    for argv in (["sample", "--ckpt", str(tmp_path / "nan.npz")],
                 ["sft", "--data", files["sft"], "--init", str(tmp_path / "nan.npz"),
                  "--out-dir", str(tmp_path / "sft")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'nan.npz'}: the weights transformer.wte.weight are NaN or infinite" in err
        assert len(err.strip().splitlines()) == 1


def test_nan_metrics_are_written_as_null(tmp_path):
    cfg = PretrainConfig(out_dir=str(tmp_path), **MODEL, max_steps=1, quiet=True)
    with Run(cfg, "pretrain") as run:
        run.restore(GPT(GPTConfig(**MODEL, vocab_size=258)), None)
        run.log(1, {"kl": float("nan"), "reward": np.float32(np.inf)})
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["kl"] is None
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


# ----- 4. one line before any work ------------------------------------------------------------------

def one_line_error(capsys, argv, code=2):
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_pretraining_text_is_one_line(files, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "folder").mkdir()
    (tmp_path / "short.txt").write_text("Hi.\n")
    for data, message in [("latin1.txt", "is not UTF-8"), ("empty.txt", "is empty"),
                          ("folder", "no .txt files"), ("short.txt", "too short for block_size=32")]:
        out = tmp_path / f"out_{data}"
        err = one_line_error(capsys, pretrain_args(files, out, 2) + ["--data", str(tmp_path / data)])
        assert message in err
        assert not (out / "metrics.jsonl").exists() and not (out / "ckpt.npz").exists()


def test_rl_max_new_tokens_is_checked_against_the_context_with_the_right_bound(files, tmp_path, capsys):
    base = ["rl", "--prompts", files["prompts"], "--init", files["pre"], "--reward-fn", files["score"],
            "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-steps", "1", "--quiet"]
    err = one_line_error(capsys, base + ["--out-dir", str(tmp_path / "a"), "--max-new-tokens", "31"])
    assert "max_new_tokens=31 does not fit the policy's context of 32 tokens" in err and "at most 30" in err
    assert cli.main(base + ["--out-dir", str(tmp_path / "b"), "--max-new-tokens", "30"]) == 0
    # the default (48) shrinks to what a context of 32 leaves
    assert cli.main(base + ["--out-dir", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "run.json").read_text())["finished"]


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_ppo_and_grpo_check_max_new_tokens_and_the_reward_models_context_at_the_start(stage, files,
                                                                                     tmp_path, capsys):
    small = RewardModel.from_gpt(GPT(GPTConfig(**{**MODEL, "block_size": 16}, vocab_size=258)))
    save_checkpoint(tmp_path / "rm.npz", small, small.config)
    base = [stage, "--prompts", files["prompts"], "--init", files["pre"], "--max-steps", "1", "--quiet"]
    score = ["--reward-fn", files["score"]]
    err = one_line_error(capsys, base + score + ["--out-dir", str(tmp_path / "a")])    # the default, 48
    assert "max_new_tokens=48 does not fit the policy's context of 32 tokens" in err and "at most 30" in err
    err = one_line_error(capsys, base + ["--reward-model", str(tmp_path / "rm.npz"), "--max-new-tokens",
                                         "8", "--out-dir", str(tmp_path / "b")])
    assert "reads 16 tokens, fewer than the policy's context of 32" in err
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()


def test_a_reward_model_with_a_shorter_context_is_refused_at_the_start(files, tmp_path, capsys):
    small = RewardModel.from_gpt(GPT(GPTConfig(**{**MODEL, "block_size": 16}, vocab_size=258)))
    save_checkpoint(tmp_path / "rm.npz", small, small.config)
    err = one_line_error(capsys, ["rl", "--prompts", files["prompts"], "--init", files["pre"],
                                  "--reward-model", str(tmp_path / "rm.npz"), "--max-new-tokens", "8",
                                  "--out-dir", str(tmp_path / "out")])
    assert "reads 16 tokens, fewer than the policy's context of 32" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_infinite_beta_and_lr_are_one_line(files, tmp_path, capsys):
    err = one_line_error(capsys, ["dpo", "--data", files["prefs"], "--init", files["pre"],
                                  "--beta", "inf", "--out-dir", str(tmp_path / "a")])
    assert "beta must be positive and finite" in err and "got inf" in err
    err = one_line_error(capsys, ["sft", "--data", files["sft"], "--init", files["pre"],
                                  "--lr", "nan", "--out-dir", str(tmp_path / "b")])
    assert "lr must be positive and finite" in err


@pytest.mark.parametrize("stage", STAGES)
def test_an_out_dir_that_is_a_file_or_not_writable_is_one_line(stage, files, tmp_path, capsys):
    argv = {"pretrain": pretrain_args(files, tmp_path, 1)[:-2],
            "sft": ["sft", "--data", files["sft"], "--init", files["pre"]],
            "reward": ["reward", "--data", files["prefs"], "--init", files["pre"]],
            "rl": ["rl", "--prompts", files["prompts"], "--init", files["pre"], "--reward-fn", files["score"]],
            "dpo": ["dpo", "--data", files["prefs"], "--init", files["pre"]],
            "ppo": ["ppo", "--prompts", files["prompts"], "--init", files["pre"],
                    "--reward-fn", files["score"]],
            "grpo": ["grpo", "--prompts", files["prompts"], "--init", files["pre"],
                     "--reward-fn", files["score"]]}[stage]
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in one_line_error(capsys, argv + ["--out-dir", str(tmp_path / "file")])
    assert "cannot write to out_dir" in one_line_error(capsys, argv + ["--out-dir", str(tmp_path / "file" / "x")])
    if os.geteuid() != 0:                              # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        assert "cannot write to out_dir" in one_line_error(capsys, argv + ["--out-dir", str(tmp_path / "ro")])


# ----- 5. settings that would make a run a silent no-op -------------------------------------------------

def test_the_mean_baseline_with_one_sample_per_prompt_is_refused_with_the_reason(files, tmp_path, capsys):
    err = one_line_error(capsys, ["rl", "--prompts", files["prompts"], "--init", files["pre"],
                                  "--reward-fn", files["score"], "--baseline", "mean",
                                  "--samples-per-prompt", "1", "--out-dir", str(tmp_path)])
    assert "every advantage is 0" in err


def test_pairs_with_chosen_equal_to_rejected_are_skipped_with_one_warning(files, tmp_path, capsys):
    records = [json.loads(line) for line in Path(files["prefs"]).read_text().splitlines()]
    records[3]["rejected"] = records[3]["chosen"]
    records[7]["rejected"] = records[7]["chosen"]
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    for stage in ("dpo", "reward"):
        result = stage_run(stage, files, tmp_path / stage, data=data, quiet=False, max_steps=1)
        err = capsys.readouterr().err
        assert err.count("skipped 2 of 12 pairs whose chosen and rejected are the same text") == 1
        assert result is not None


# ----- 6. smaller things ------------------------------------------------------------------------------

def test_dpo_computes_reference_log_probs_only_for_the_batches_it_meets(files, tmp_path, monkeypatch):
    records = [json.loads(line) for line in Path(files["prefs"]).read_text().splitlines()] * 10
    data = write_jsonl(tmp_path / "prefs.jsonl", records)                 # 120 pairs
    scored = []
    pair_logps = dpo_module.pair_logps

    def counting(model, pairs, device):
        scored.append(len(pairs))
        return pair_logps(model, pairs, device)
    monkeypatch.setattr(dpo_module, "pair_logps", counting)
    stage_run("dpo", files, tmp_path / "out", data=data, max_steps=1, val_fraction=0.0)
    assert sum(scored) <= 4 + 4 * 4          # the policy's batch, and at most 4 chunks of 4 for p_ref


def test_the_readme_and_the_default_inits_point_where_the_commands_write():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "minirlhf sample --ckpt runs/demo/pretrain/ckpt.npz" in readme     # where the demo writes
    def default(cls, name):
        return cls.__dataclass_fields__[name].default
    assert default(SFTConfig, "init") == default(PretrainConfig, "out_dir") + "/ckpt.npz"
    assert default(RewardConfig, "init") == default(PretrainConfig, "out_dir") + "/ckpt.npz"
    for cls in (RLConfig, PPOConfig, GRPOConfig, DPOConfig):
        assert default(cls, "init") == default(SFTConfig, "out_dir") + "/ckpt.npz"


def test_a_bad_json_line_gives_one_line_number(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n{"prompt": 1}\n')
    err = one_line_error(capsys, ["sft", "--data", str(path), "--out-dir", str(tmp_path / "o")])
    assert "line 2: not valid JSON" in err and "column" not in err and "line 1" not in err


def test_checkpoints_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        model = GPT(GPTConfig(**MODEL, vocab_size=258))
        save_checkpoint(tmp_path / "c.npz", model, model.config)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.npz").stat().st_mode) == 0o644


def test_each_stage_leaves_a_one_line_summary(files, tmp_path, capsys):
    stage_run("sft", files, tmp_path, quiet=False, max_steps=2)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("sft: 2 steps in ") and "loss" in last and str(tmp_path / "ckpt.npz") in last


def test_closed_form_example_writes_its_plot_into_an_output_folder(tmp_path):
    pytest.importorskip("matplotlib")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "closed_form.py"), "--smoke"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(tmp_path.glob("*.png"))
    assert list(tmp_path.glob("runs/**/*.png"))
