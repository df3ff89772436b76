"""The README's first command is what CI runs: a user who copies it runs exactly CI's install and tests."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.helpers import REPO

_BINARY = {".png", ".npz", ".ckpt", ".pyc", ".safetensors"}


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "the README starts with a bash block holding its two commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readmes_test_command() -> None:
    test_command, main_job = _readme_commands()[:2]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == test_command
    assert main_job == "sowa demo"
    assert "-c constraints/ci.txt" in test_command and (REPO / "constraints" / "ci.txt").is_file()


def test_nothing_reaches_outside_the_repository() -> None:
    """No file of the project names the folder beside the checkout: users who clone it do not have one."""
    beside = re.compile(r"\.\./shared|parents?(\[\d\])? ?/ ?[\"']shared[\"']")
    offenders = []
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, listed):
        path = REPO / rel
        if not path.is_file() or path == Path(__file__) or path.suffix in _BINARY:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        offenders += [f"{rel}:{n}" for n, line in enumerate(text.splitlines(), 1) if beside.search(line)]
    assert not offenders
