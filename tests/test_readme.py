"""The README's set-up commands are what CI runs, and the demo config is the embedded default."""

import re
from pathlib import Path

from angelptm.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    demo, tests = setup_commands()
    assert "angelptm train" in demo and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_demo_config_spells_out_the_defaults():
    assert load_config(ROOT / "configs" / "demo.yaml") == load_config()
