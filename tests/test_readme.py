"""The README's promises: its code links point at the lines they quote, its files exist, and its
set-up commands are the ones CI runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
LINE_LINKS = re.findall(r"\[`([^`]+)`\]\(([^)#]+)#L(\d+)\)", README)
FILE_LINKS = re.findall(r"\]\(((?:minirlhf|tests|examples|benchmarks)/[^)#]*)\)", README)


def test_the_readme_has_formula_links():
    assert len(LINE_LINKS) >= 12


@pytest.mark.parametrize("code, path, line", LINE_LINKS, ids=[c[:40] for c, _, _ in LINE_LINKS])
def test_each_formula_link_opens_the_line_it_quotes(code, path, line):
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    assert code in lines[int(line) - 1], f"{path}#L{line} is now: {lines[int(line) - 1].strip()!r}"


@pytest.mark.parametrize("path", sorted(set(FILE_LINKS)))
def test_each_linked_file_exists(path):
    assert (ROOT / path).exists()


def test_the_first_commands_are_the_install_and_test_commands_ci_runs():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert 'pip install -e ".[test]"' in first_block and "python -m pytest -q" in first_block
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[test]"' in ci and "python -m pytest -q" in ci
