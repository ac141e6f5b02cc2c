"""The import contracts of docs/architecture.md (pyproject.toml, ``lint-imports``) hold for the
code, and an upward import or a cycle breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with the project's contracts over the package copied to ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    return subprocess.run([str(LINT), "--no-cache", str(tree / "pyproject.toml")], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "src" / "rewardloop", tmp_path / "src" / "rewardloop",
                    ignore=shutil.ignore_patterns("__pycache__", "static", "templates"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _add_import(module: Path, line: str) -> None:
    text = module.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    module.write_text(head + sep + line + "\n" + rest)


def test_the_code_keeps_the_contracts(tree: Path) -> None:
    res = _lint(tree)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 kept, 0 broken" in res.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    # data is below eval: a store helper must not reach up for a metric
    ("data/load.py", "import rewardloop.eval.report", "rewardloop layers"),
    # a local import hides the edge from a reader, not from the checker
    ("score.py", "def _f() -> None:\n    import rewardloop.train.run", "rewardloop layers"),
    ("train/sft.py", "import rewardloop.data.store", "trainers read files, never the store"),
    ("feedback/select.py", "import rewardloop.rollout", "feedback plans and records"),
    # same layer, but rewards imports score already: a cycle
    ("score.py", "import rewardloop.rewards", "no import cycles"),
])
def test_an_upward_import_breaks_a_contract(tree: Path, module: str, line: str,
                                            broken: str) -> None:
    _add_import(tree / "src" / "rewardloop" / module, line)
    res = _lint(tree)
    assert res.returncode == 1, res.stdout + res.stderr
    verdicts = [ln for ln in res.stdout.splitlines() if ln.endswith(("KEPT", "BROKEN"))]
    # The named contract breaks (an upward edge that closes a loop breaks the cycle contract
    # too: eval, for one, imports data).
    named = [ln for ln in verdicts if ln.startswith(broken)]
    assert named and all(ln.endswith("BROKEN") for ln in named), verdicts
