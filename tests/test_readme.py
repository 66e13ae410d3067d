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


def test_design_citations_resolve_to_the_architecture_document() -> None:
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "ARCHITECTURE.md").read_text(), re.M))
    cited = []
    gone = "DESIGN" + " §"  # the design notes this project started from are not in it
    for path in [
        *(ROOT / "service").rglob("*.py"),
        *(ROOT / "tests").rglob("*.py"),
        ROOT / "README.md",
        ROOT / "triton_models" / "MODEL_CARD.md",
    ]:
        text = path.read_text()
        assert gone not in text, f"{path} cites a design file that is not in the repository"
        cited += re.findall(r"ARCHITECTURE\.md\s+§(\d+)", text)
    assert cited and set(cited) <= sections
