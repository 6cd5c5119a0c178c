"""The preference family's stages (kto, cpo, simpo, orpo, dpo --loss-type) end to end on tiny files:
TRL's metric names, a resume bit for bit, divergence, a Hugging Face --init, and bad input in one line."""

import numpy as np
import pytest

from minirlhf import cli
from minirlhf.datasets import DataError, load_unpaired, unpair_preferences
from minirlhf.train.cpo import CPOConfig, SimPOConfig, cpo, simpo
from minirlhf.train.dpo import DPOConfig, dpo
from minirlhf.train.kto import KTOConfig, kto
from minirlhf.train.orpo import ORPOConfig, orpo
from minirlhf.train.pretrain import PretrainConfig, pretrain
from minirlhf.train.run import DivergenceError, Interrupted
from test_faults import assert_same_run, metrics, run_each_straight, stop_at, write_jsonl

HF_FOLDER = "tests/fixtures/gpt2_lm"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny pretrained GPT (dropout on: its RNG is resumed too), a pairs file and an unpaired one."""
    root = tmp_path_factory.mktemp("preference")
    corpus = root / "corpus.txt"
    corpus.write_text("Now is the winter of our discontent made glorious summer.\n" * 30)
    pretrain(PretrainConfig(data=str(corpus), out_dir=str(root / "pre"), n_layer=1, n_head=2,
                            n_embd=32, block_size=32, dropout=0.1, batch_size=4, max_steps=2,
                            eval_interval=2, eval_batches=1, sample_interval=0, quiet=True))
    texts = [f"S{i}: {w}" for i, w in enumerate(["love", "hate", "sweet", "foul", "fair", "night"] * 2)]
    prefs = [{"prompt": t, "chosen": "fair love", "rejected": "foul hate"} for t in texts]
    unpaired = [{"prompt": t, "completion": ["foul", "sweet love"][i % 3 > 0], "label": i % 3 > 0}
                for i, t in enumerate(texts)]
    return {"root": root, "pre": str(root / "pre" / "ckpt.npz"),
            "prefs": write_jsonl(root / "prefs.jsonl", prefs),
            "unpaired": write_jsonl(root / "unpaired.jsonl", unpaired)}


STAGES = {
    "kto": (KTOConfig, kto, {"data": "unpaired"}),
    "kto_pairs": (KTOConfig, kto, {"data": "prefs"}),
    "simpo": (SimPOConfig, simpo, {"data": "prefs"}),
    "cpo_simpo": (CPOConfig, cpo, {"data": "prefs", "loss_type": "simpo"}),
    "orpo": (ORPOConfig, orpo, {"data": "prefs"}),
    "dpo_mpo": (DPOConfig, dpo, {"data": "prefs", "loss_type": "sigmoid,bco_pair,sft",
                                 "loss_weights": "0.8,0.2,1"}),
    "dpo_exo": (DPOConfig, dpo, {"data": "prefs", "loss_type": "exo_pair", "label_smoothing": 1e-3}),
}


def stage_run(stage, files, out, **over):
    """``stage`` for 6 steps (checkpoints every 2, held-out metrics every 3) into ``out``."""
    cls, fn, extra = STAGES[stage]
    settings = dict(init=files["pre"], out_dir=str(out), max_steps=6, ckpt_interval=2, batch_size=4,
                    warmup_steps=2, eval_interval=3, quiet=True)
    settings.update(extra, data=files[extra["data"]])
    return fn(cls(**{**settings, **over}))


@pytest.fixture(scope="module")
def straight(files):
    return run_each_straight(STAGES, stage_run, files)


TRL_NAMES = {
    "kto": {"loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"},
    "simpo": {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected", "nll_loss"},
    "orpo": {"loss", "rewards/margins", "rewards/accuracies", "nll_loss", "log_odds_ratio",
             "log_odds_chosen"},
    "dpo_mpo": {"loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen"},
}


@pytest.mark.parametrize("stage", sorted(TRL_NAMES))
def test_each_stage_logs_trls_metric_names_every_step_and_held_out_ones(stage, straight):
    rows, _ = straight[stage]
    assert [r["step"] for r in rows] == list(range(1, 7))
    seen = set().union(*rows)
    assert TRL_NAMES[stage] <= seen
    assert {f"val_{k}" for k in TRL_NAMES[stage] if k != "kl"} & seen
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_kto_starts_at_half_and_moves_desirable_above_undesirable(files, tmp_path):
    stage_run("kto", files, tmp_path, max_steps=12, lr=3e-3)
    rows = metrics(tmp_path)
    # policy = reference, up to the policy's dropout: 1 - σ(0) = 1/2 for every example
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-2)
    last = [r for r in rows if "rewards/margins" in r][-1]
    assert last["rewards/margins"] > 0



def test_cpo_simpo_equals_simpo(files, tmp_path):
    simpo_rows = metrics(files["root"] / "straight_simpo")
    stage_run("cpo_simpo", files, tmp_path, beta=2.0, cpo_alpha=0.0)
    rows = metrics(tmp_path)
    assert [r["loss"] for r in rows] == [r["loss"] for r in simpo_rows]


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_crash_resumes_from_the_last_checkpoint_bit_for_bit(stage, files, straight, tmp_path,
                                                              monkeypatch):
    with monkeypatch.context() as m:
        stop_at(m, 5, "crash")
        with pytest.raises(RuntimeError, match="simulated crash"):
            stage_run(stage, files, tmp_path)
    stage_run(stage, files, tmp_path)
    assert_same_run(tmp_path, straight[stage])


def test_ctrl_c_then_the_same_command_gives_the_straight_kto_run(files, straight, tmp_path,
                                                                 monkeypatch):
    with monkeypatch.context() as m:
        stop_at(m, 3, "sigint")
        with pytest.raises(Interrupted):
            stage_run("kto", files, tmp_path)
    stage_run("kto", files, tmp_path)
    assert_same_run(tmp_path, straight["kto"])


@pytest.mark.parametrize("stage", ["kto", "simpo", "orpo", "dpo_mpo"])
def test_divergence_stops_the_run_with_the_stage_named(stage, files, tmp_path):
    name = stage.split("_")[0]
    with pytest.raises(DivergenceError, match=f"{name} diverged at step"):
        stage_run(stage, files, tmp_path, lr=1e30, grad_clip=0.0)


@pytest.mark.parametrize("stage", ["kto", "orpo"])
def test_init_from_a_hugging_face_folder(stage, files, tmp_path):
    result = stage_run(stage, files, tmp_path, init=HF_FOLDER, max_steps=1, batch_size=2)
    assert np.isfinite(result["loss"])


# ----- data ------------------------------------------------------------------------------------------

def test_a_pairs_file_is_split_as_trls_unpair_preference_dataset(files):
    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]
    assert [(r["prompt"], r["completion"], r["label"]) for r in unpair_preferences(pairs)] == [
        ("p0", "c0", True), ("p1", "c1", True), ("p2", "c2", True),
        ("p0", "r0", False), ("p1", "r1", False), ("p2", "r2", False)]
    examples = load_unpaired(files["prefs"])
    assert len(examples) == 24 and sum(r["label"] for r in examples) == 12
    assert examples[12].line == 1                                         # each keeps its line


def test_a_batch_of_one_kind_trains(files, tmp_path):
    """Batches of 2 from a file of 4 good examples then 4 bad ones, in order: many batches hold one
    kind only (TRL's behaviour: the loss is that kind's mean)."""
    rows = [{"prompt": f"S{i}", "completion": "sweet love" if i < 4 else "foul", "label": i < 4}
            for i in range(8)]
    data = write_jsonl(tmp_path / "sorted.jsonl", rows)
    kto(KTOConfig(data=data, init=files["pre"], out_dir=str(tmp_path / "out"), batch_size=2,
                  max_steps=4, val_fraction=0.0, quiet=True))
    logged = metrics(tmp_path / "out")
    assert any("rewards/chosen" not in r or "rewards/rejected" not in r for r in logged)
    assert all(np.isfinite(r["loss"]) for r in logged)


def one_line_error(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "completion": "b", "label": true}', '{"prompt": "a", "completion": "c", "label": 1}'],
     "line 2: field 'label' must be a boolean"),
    (['{"prompt": "a", "completion": "b", "label": true}', '{"prompt": "a", "completion": "c"}'],
     "line 2: missing field 'label'"),
    (['{"prompt": "a", "completion": "b", "label": true}', '{"prompt": "a", "completion": "c", "label": true}'],
     "no undesirable example"),
    (['{"prompt": "a", "completion": "b", "label": false}'], "no desirable example"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": "b"}'],
     "line 2: missing field 'rejected'"),
])
def test_bad_unpaired_data_is_one_line_naming_the_file_and_line(lines, message, files, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    err = one_line_error(capsys, ["kto", "--data", str(data), "--init", files["pre"], "--out-dir",
                                  str(tmp_path / "out"), "--quiet"])
    assert message in err and "bad.jsonl" in err
    with pytest.raises(DataError, match=message):
        load_unpaired(data)


@pytest.mark.parametrize("argv, message", [
    (["kto", "--data", "{unpaired}", "--batch-size", "1"], "batch_size must be at least 2 for KTO"),
    (["dpo", "--data", "{prefs}", "--loss-type", "sigmoid,hinje"],
     "unknown loss_type hinje; known: sigmoid, hinge, ipo, exo_pair"),
    (["dpo", "--data", "{prefs}", "--loss-type", "sigmoid,hinge", "--loss-weights", "1,2,3"],
     "3 loss_weights for 2 loss types"),
    (["dpo", "--data", "{prefs}", "--loss-weights", "1,x"], "loss_weights must be comma-separated numbers"),
    (["dpo", "--data", "{prefs}", "--loss-type", "exo_pair"], "needs label_smoothing > 0"),
    (["simpo", "--data", "{prefs}", "--gamma", "-1"], "gamma must be a finite number >= 0"),
    (["cpo", "--data", "{prefs}", "--label-smoothing", "0.7"], "label_smoothing must be in [0, 0.5]"),
])
def test_impossible_settings_are_one_line_before_any_work(argv, message, files, tmp_path, capsys):
    argv = [a.format(**files) for a in argv]
    err = one_line_error(capsys, [*argv, "--init", files["pre"], "--out-dir", str(tmp_path / "out"), "--quiet"])
    assert message in err
    assert not (tmp_path / "out" / "ckpt.npz").exists()
