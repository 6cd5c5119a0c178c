"""The demo's best-of-n baseline: Gao et al.'s fitted forms, and the stage in the smoke demo."""

import json

import numpy as np
import pytest

from minirlhf import cli
from minirlhf.train.demo import bon as demo_bon


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_the_fit_recovers_the_coefficients_of_its_form(form):
    d = np.array([0.0, 0.4, 0.8, 1.3, 1.9, 2.5])
    gain = demo_bon.curve((0.7, 0.2), d, form)
    alpha, beta = demo_bon.fit(d, gain, form)
    assert alpha == pytest.approx(0.7, abs=1e-12) and beta == pytest.approx(0.2, abs=1e-12)
    assert demo_bon.fit([0.0, 1.0], [0.0, 1.0], form) is None       # one point with d > 0


def test_the_forms_are_gaos():
    d = np.array([0.5, 2.0])
    np.testing.assert_allclose(demo_bon.curve((1.0, 0.3), d, "bon"), d * (1.0 - 0.3 * d))
    np.testing.assert_allclose(demo_bon.curve((1.0, 0.3), d, "rl"), d * (1.0 - 0.3 * np.log(d)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_bon")
    assert cli.main(["demo", "--smoke", "--out-dir", str(out), "--quiet"]) == 0
    return out


def test_the_smoke_demo_runs_best_of_n_and_reports_it(smoke):
    table = [json.loads(line) for line in (smoke / "bon" / "bon.jsonl").open()]
    assert [r["n"] for r in table] == [1, 2, 4]
    report = (smoke / "report.md").read_text(encoding="utf-8")
    assert "## Best-of-n" in report and "| n | reward model | gold ± se | KL formula |" in report
    assert "| best-of-n | gold |" in report and "| RL | reward model |" in report
    summary = json.loads((smoke / "summary.json").read_text())
    assert summary["bon"] == table and set(summary["gao_fits"]) == {"bon", "rl"}


def test_the_best_of_n_plot_is_drawn(smoke):
    pytest.importorskip("matplotlib")
    assert (smoke / "bon_frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![best-of-n against RL](bon_frontier.png)" in (smoke / "report.md").read_text()
