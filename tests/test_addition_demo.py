"""`minirlhf demo --task addition` end to end (the smoke settings), and its report's arithmetic."""

import json

import pytest

from minirlhf import cli
from minirlhf.tasks import addition as A
from minirlhf.train.demo.addition_report import gain_over, pass_table


def test_pass_table_counts_by_digits_and_gain_is_paired():
    ev = {"samples": 4, "right": [4, 0, 2, 1], "digits": [1, 1, 2, 2]}
    table = pass_table(ev, k=2)
    assert table[1][0] == pytest.approx(0.5) and table[2][0] == pytest.approx(3 / 8)
    assert table[2][2] == pytest.approx((A.pass_at_k(4, 2, 2) + A.pass_at_k(4, 1, 2)) / 2)
    assert table["all"][3] == 4
    base = {"samples": 4, "right": [3, 0, 1, 1], "digits": [1, 1, 2, 2]}
    gain, se = gain_over(ev, base)
    assert gain == pytest.approx(0.125)                 # per-prompt differences 1/4, 0, 1/4, 0
    assert se == pytest.approx((4 * 0.125 ** 2 / 3) ** 0.5 / 2)   # sample std (ddof 1) / √4


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("addition_demo") / "run"
    assert cli.main(["demo", "--task", "addition", "--smoke", "--out-dir", str(out), "--quiet"]) == 0
    return out


def test_the_smoke_demo_writes_the_tables_and_logs_grpo_zero_std_groups(smoke_run):
    report = (smoke_run / "report.md").read_text(encoding="utf-8")
    for text in ("pass@1 (pass@8)", "| SFT |", "| REINFORCE (RLOO) |", "| PPO |", "| GRPO |",
                 "gain ± SE", "frac_reward_zero_std"):
        assert text in report
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert set(summary["gain"]) == {"REINFORCE (RLOO)", "PPO", "GRPO"}
    assert summary["frac_reward_zero_std"] is not None
    held_out = [tuple(p) for p in json.loads((smoke_run / "data" / "held_out.json").read_text())]
    prompts = {json.loads(line)["prompt"] for line in (smoke_run / "data" / "prompts_train.jsonl").open()}
    assert not prompts & {A.prompt_text(a, b) for a, b in held_out}
    assert not list(smoke_run.rglob("*.tmp"))


def test_a_second_run_reuses_every_stage_and_another_task_is_refused(smoke_run, capsys):
    files = sorted(smoke_run.rglob("*.npz"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert cli.main(["demo", "--task", "addition", "--smoke", "--out-dir", str(smoke_run)]) == 0
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    err = capsys.readouterr().err
    assert "sft: reused" in err and "grpo: reused" in err and "eval GRPO: reused" in err
    assert cli.main(["demo", "--smoke", "--out-dir", str(smoke_run)]) == 2
    assert "holds a demo run with other settings" in capsys.readouterr().err


def test_a_damaged_plan_json_is_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "plan.json").write_text("{not json")
    for task in ("addition", "sentiment"):
        assert cli.main(["demo", "--task", task, "--smoke", "--out-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "plan.json: not valid JSON" in err
