"""The README's two set-up commands stay true: CI runs exactly the second one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme, flags=re.S)[:2]
    assert len(commands) == 2
    serve, test = commands
    assert "kappamask serve" in serve and "pytest" in test
    assert test.strip() in (ROOT / ".ci" / "run").read_text()
