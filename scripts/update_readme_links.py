"""Point the README's formula links at the lines they quote, after code has moved.

    python scripts/update_readme_links.py

A link looks like [`quoted code`](path#L123); the quoted code must occur on exactly one line of the
file (tests/test_readme.py checks the links stay true).
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[`([^`]+)`\]\(([^)#]+)#L(\d+)\)")


def fix(match):
    code, path, _ = match.groups()
    hits = [i for i, line in enumerate((ROOT / path).read_text().splitlines(), 1) if code in line]
    if len(hits) != 1:
        raise SystemExit(f"{path}: `{code}` is on {len(hits)} lines, need exactly 1")
    return f"[`{code}`]({path}#L{hits[0]})"


readme = ROOT / "README.md"
readme.write_text(LINK.sub(fix, readme.read_text()))
