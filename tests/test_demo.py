"""The plays as dialogue pairs, and `minirlhf demo` end to end (the smoke settings)."""

import json
import re

import pytest

from minirlhf import cli
from minirlhf.datasets import load_sft
from minirlhf.dialogue import (corpus_pairs, dialogue_pairs, format_speech, parse_play, split_pairs,
                               write_jsonl)
from minirlhf.train.common import ConfigError
from minirlhf.train.demo import DemoConfig, make_plan, parse_betas

PLAY = """THE TRAGEDY OF A TEST

PERSONS REPRESENTED.

Ber., a Sentinel.
Fran., another.

ACT I.

Scene I. A platform.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.
[Aside.] He comes most carefully.

Ber.
Long live the king!

Fran.
Bernardo?

[Enter Horatio and
Marcellus.]

Ber.
Friends, welcome.

Hor.
Friends to this ground.

[Exit.]

And liegemen to the Dane.

Scene II. A room.

MARCELLUS
A scene of its own, without a full stop.

Hor.
Farewell.

MARCELLUS
Farewell, good Horatio.
"""


# ----- the parser on a small made-up play --------------------------------------------------------------

def test_speeches_are_split_by_scene_with_stage_directions_removed():
    scenes = parse_play(PLAY, "test")
    assert [[(s.speaker, s.text) for s in scene] for scene in scenes] == [
        [("Ber.", "Who's there?"),
         ("Fran.", "Nay, answer me: stand, and unfold yourself.\nHe comes most carefully."),
         ("Ber.", "Long live the king!"),
         ("Fran.", "Bernardo?"),
         ("Ber.", "Friends, welcome."),
         ("Hor.", "Friends to this ground.\nAnd liegemen to the Dane.")],   # goes on after [Exit.]
        [("MARCELLUS.", "A scene of its own, without a full stop."),
         ("Hor.", "Farewell."),
         ("MARCELLUS.", "Farewell, good Horatio.")],
    ]
    assert all(s.play == "test" for scene in scenes for s in scene)


def test_a_name_line_seen_only_once_in_a_play_is_not_trusted():
    play = PLAY.replace("Friends to this ground.", "Friends to this ground.\n\nAmen.\nSo be it.")
    speeches = [s for scene in parse_play(play) for s in scene]
    assert "Amen." not in {s.speaker for s in speeches}
    assert speeches[5].text.endswith("Amen.\nSo be it.\nAnd liegemen to the Dane.")


def test_a_speaker_does_not_reply_to_himself():
    play = "ACT I.\n\nBer.\nOne.\n\nBer.\nTwo.\n\nFran.\nThree.\n\nFran.\nFour.\n"
    assert [(p["prompt"], p["completion"]) for p in dialogue_pairs(play)] == \
        [("Ber.\nTwo.\n", "Fran.\nThree.\n")]


def test_the_cast_list_before_the_first_act_is_not_dialogue():
    speakers = {s.speaker for scene in parse_play(PLAY) for s in scene}
    assert speakers == {"Ber.", "Fran.", "Hor.", "MARCELLUS."}


def test_pairs_are_a_speech_and_the_reply_of_another_speaker_in_the_same_scene():
    pairs = dialogue_pairs(PLAY, "test", max_reply_bytes=80)
    got = [(p["prompt"].split("\n")[0], p["completion"].split("\n")[0], p["scene"]) for p in pairs]
    # nothing crosses from scene 0 to scene 1
    assert got == [("Ber.", "Fran.", 0), ("Fran.", "Ber.", 0), ("Ber.", "Fran.", 0),
                   ("Fran.", "Ber.", 0), ("Ber.", "Hor.", 0),
                   ("MARCELLUS.", "Hor.", 1), ("Hor.", "MARCELLUS.", 1)]
    assert pairs[0] == {"prompt": "Ber.\nWho's there?\n",
                        "completion": "Fran.\nNay, answer me: stand, and unfold yourself.\n"
                                      "He comes most carefully.\n",
                        "play": "test", "scene": 0}


def test_long_replies_and_prompts_are_left_out():
    short = dialogue_pairs(PLAY, max_reply_bytes=len(format_speech("Hor.", "Farewell.")))
    assert [p["completion"] for p in short] == ["Hor.\nFarewell.\n"]
    assert dialogue_pairs(PLAY, max_prompt_bytes=10) == []


# ----- the parser on the built-in corpus -----------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
    return corpus_pairs(max_reply_bytes=80)


def test_the_corpus_gives_thousands_of_pairs_from_every_play(corpus):
    assert len(corpus) > 1000
    plays = {p["play"] for p in corpus}
    assert len(plays) == 10
    assert all(sum(p["play"] == play for p in corpus) > 100 for play in plays)


def test_corpus_pairs_have_the_speech_form_and_no_stage_directions(corpus):
    name = re.compile(r"^[A-Z0-9][A-Za-z0-9 .,'&-]*\.$")
    for p in corpus:
        for text in (p["prompt"], p["completion"]):
            speaker, body = text.split("\n", 1)
            assert name.match(speaker) and len(speaker) <= 32, text
            assert body.strip() and body.endswith("\n"), text
            assert "[" not in text and "]" not in text, text
            assert not re.search(r"^(ACT|SCENE|Scene|Act) ", body, re.M), text
        assert p["prompt"].split("\n")[0] != p["completion"].split("\n")[0]
        assert len(p["completion"].encode()) <= 80


def test_the_split_is_deterministic_and_keeps_a_prompt_on_one_side(corpus):
    train, held = split_pairs(corpus, 0.1)
    assert 0.05 < len(held) / len(corpus) < 0.15
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held}
    assert split_pairs(corpus, 0.1) == (train, held)


def test_sft_jsonl_loads_with_load_sft(corpus, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", corpus[:20], ("prompt", "completion"))
    assert [(r["prompt"], r["completion"]) for r in load_sft(path)] == \
        [(p["prompt"], p["completion"]) for p in corpus[:20]]


# ----- settings ------------------------------------------------------------------------------------------

def test_betas_parse_and_bad_ones_are_config_errors():
    assert parse_betas("0.05, 0.2", "rl_betas") == (0.05, 0.2)
    for bad in ("", "x", "0.1,-1", "0.1,0.1", "nan"):
        with pytest.raises(ConfigError):
            parse_betas(bad, "rl_betas")


def test_the_plan_takes_beta_overrides():
    plan = make_plan(DemoConfig(rl_betas="0.3", dpo_betas="0.1,1"))
    assert plan["rl"]["betas"] == (0.3,) and plan["dpo"]["betas"] == (0.1, 1.0)
    assert make_plan(DemoConfig(smoke=True))["pretrain"]["max_steps"] < 10


# ----- the demo end to end -------------------------------------------------------------------------------

def run_smoke(out, *extra):
    return cli.main(["demo", "--smoke", "--out-dir", str(out), *extra])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert run_smoke(out, "--quiet") == 0
    return out


def test_smoke_demo_writes_the_report_with_its_tables(smoke_run):
    report = (smoke_run / "report.md").read_text(encoding="utf-8")
    assert "| policy | gold reward ± se | gain over SFT | reward model | KL to SFT |" in report
    for row in ("| SFT |", "| RL β=0.1 |", "| PPO β=0.1 |", "| DPO β=0.1 |", "| GRPO β=0 |"):
        assert row in report
    assert "Reward model: on" in report
    assert "**Target**" in report and ("**met**" in report or "**not met**" in report)
    assert "## Training" in report and "## Replies before and after" in report
    assert "## Settings" in report
    assert "## Times" in report
    training = report.split("## RL, PPO and GRPO: reward model against gold during training")[1]
    rows = [line for line in training.split("\n\n")[1].splitlines() if line.startswith("| GRPO β=0 |")]
    assert len(rows) == 1 and rows[0].endswith("| — |")     # at β = 0 GRPO logs no KL
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert set(summary["policies"]) == {"SFT", "RL β=0.1", "PPO β=0.1", "DPO β=0.1", "GRPO β=0",
                                        "KTO β=0.1", "SimPO β=2", "ORPO β=0.1"}
    for row in ("| KTO β=0.1 |", "| SimPO β=2 |", "| ORPO β=0.1 |", "- SimPO β=2: "):
        assert row in report
    assert summary["policies"]["SFT"]["kl"] == 0.0


def test_smoke_demo_writes_every_stage_and_logs_gold_during_rl(smoke_run):
    for path in ("pretrain/ckpt.npz", "sft/ckpt.npz", "reward/ckpt.npz", "rl_beta0.1/ckpt.npz",
                 "dpo_beta0.1/ckpt.npz", "ppo_beta0.1/ckpt.npz", "ppo_beta0.1/value.npz",
                 "data/sft_train.jsonl", "labels/prefs_train.jsonl",
                 "labels/prefs_held_out.jsonl", "eval/sft.json"):
        assert (smoke_run / path).exists(), path
    rows = [json.loads(line) for line in (smoke_run / "rl_beta0.1" / "metrics.jsonl").open()]
    assert all("gold" in r and "reward" in r for r in rows)
    rows = [json.loads(line) for line in (smoke_run / "ppo_beta0.1" / "metrics.jsonl").open()]
    assert all("gold" in r and "objective/scores" in r for r in rows)
    assert not list(smoke_run.rglob("*.tmp"))


def test_a_second_run_reuses_every_finished_stage(smoke_run, capsys):
    ckpts = sorted(smoke_run.rglob("*.npz")) + sorted(smoke_run.rglob("*.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in ckpts if p.name != "metrics.jsonl"}
    assert run_smoke(smoke_run) == 0
    err = capsys.readouterr().err
    assert err.count("reused") >= 8
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_an_interrupted_run_goes_on_where_it_stopped(smoke_run, tmp_path, capsys):
    """Simulate a stop after RL: remove DPO's checkpoint and the evaluations; only they run again."""
    import shutil
    shutil.copytree(smoke_run, tmp_path / "run")
    run = tmp_path / "run"
    (run / "dpo_beta0.1" / "ckpt.npz").unlink()
    shutil.rmtree(run / "eval")
    sft_mtime = (run / "sft" / "ckpt.npz").stat().st_mtime_ns
    assert run_smoke(run) == 0
    err = capsys.readouterr().err
    assert "sft: reused" in err and "dpo_beta0.1 ..." in err
    assert (run / "dpo_beta0.1" / "ckpt.npz").exists() and (run / "eval" / "sft.json").exists()
    assert (run / "sft" / "ckpt.npz").stat().st_mtime_ns == sft_mtime


def test_a_stage_that_ran_again_makes_the_later_stages_run_again(smoke_run, tmp_path, capsys):
    import os
    import shutil
    shutil.copytree(smoke_run, tmp_path / "run")
    run = tmp_path / "run"
    sft_ckpt = run / "sft" / "ckpt.npz"
    later = sft_ckpt.stat().st_mtime + 10
    os.utime(sft_ckpt, (later, later))          # as if SFT had just been trained again
    assert run_smoke(run) == 0
    err = capsys.readouterr().err
    assert "pretrain: reused" in err and "data: reused" in err and "sft: reused" in err
    for stage in ("labels ...", "reward ...", "rl_beta0.1 ...", "dpo_beta0.1 ...", "eval SFT ..."):
        assert stage in err


def test_an_unfinished_pretraining_run_is_resumed(tmp_path, capsys):
    from minirlhf.checkpoint import load_checkpoint
    from minirlhf.train.pretrain import PretrainConfig, pretrain
    from minirlhf.train.demo import SMOKE
    # what an interrupted demo leaves: a pretraining checkpoint at step 2 of 4
    pretrain(PretrainConfig(out_dir=str(tmp_path / "pretrain"), **SMOKE["model"],
                            **{**SMOKE["pretrain"], "max_steps": 2}, sample_interval=0, seed=1337,
                            quiet=True))
    assert run_smoke(tmp_path, "--quiet") == 0
    assert load_checkpoint(tmp_path / "pretrain" / "ckpt.npz")["step"] == SMOKE["pretrain"]["max_steps"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "pretrain" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]   # resumed at 3, not restarted


def run_error(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


def test_bad_options_give_one_clear_line(tmp_path, capsys):
    assert "rl_betas" in run_error(capsys, ["demo", "--smoke", "--out-dir", str(tmp_path / "a"),
                                            "--rl-betas", "0.1,-2"])
    assert "dpo_betas" in run_error(capsys, ["demo", "--smoke", "--out-dir", str(tmp_path / "b"),
                                             "--dpo-betas", "big"])
    (tmp_path / "file").write_text("x")
    assert "is a file" in run_error(capsys, ["demo", "--smoke", "--out-dir", str(tmp_path / "file")])
    with pytest.raises(SystemExit) as e:   # argparse's own check of --preset's choices
        cli.main(["demo", "--preset", "huge"])
    assert e.value.code == 2


def test_a_run_folder_of_other_settings_is_refused(smoke_run, tmp_path, capsys):
    import shutil
    shutil.copytree(smoke_run, tmp_path / "run")
    err = run_error(capsys, ["demo", "--smoke", "--seed", "5", "--out-dir", str(tmp_path / "run")])
    assert "other settings" in err


def test_without_matplotlib_the_report_says_so_in_one_line(smoke_run, tmp_path, monkeypatch):
    import shutil
    import sys
    shutil.copytree(smoke_run, tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    assert run_smoke(tmp_path / "run", "--quiet") == 0
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert [line for line in report.splitlines() if "matplotlib" in line] == \
        [line for line in report.splitlines() if line.startswith("matplotlib is not installed")]
    assert "matplotlib is not installed" in report


def test_with_matplotlib_the_plots_are_drawn(smoke_run, tmp_path):
    pytest.importorskip("matplotlib")
    import shutil
    shutil.copytree(smoke_run, tmp_path / "run")
    assert run_smoke(tmp_path / "run", "--quiet") == 0
    for png in ("frontier.png", "rl_gold_vs_rm.png"):
        assert (tmp_path / "run" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![gold reward against KL](frontier.png)" in (tmp_path / "run" / "report.md").read_text()
