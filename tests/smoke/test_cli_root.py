"""The root command: version, help for every command, user errors as exit 2 without traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from rewardloop import __version__
from rewardloop.cli import app


def _all_commands(cmd, path: tuple[str, ...] = ()):
    yield path, cmd
    # Typer's groups are not always click.Group subclasses: duck-type on `commands`.
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _all_commands(sub, (*path, name))


def test_version() -> None:
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"rewardloop {__version__}"


def test_every_command_and_flag_has_help() -> None:
    root = get_command(app)
    seen = 0
    for path, cmd in _all_commands(root):
        res = CliRunner().invoke(app, [*path, "--help"])
        assert res.exit_code == 0, (path, res.output)
        if path:
            assert (cmd.help or cmd.short_help), f"{' '.join(path)} has no help text"
        for param in cmd.params:
            if getattr(param, "param_type_name", "") == "option" and param.name != "help":
                assert param.help, f"{' '.join(path)} {param.opts} has no help text"
        seen += 1
    assert seen > 3


def test_user_error_is_exit_2_one_line(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rewardloop.cli", "report",
                           str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["report", "/nonexistent/run"]])
def test_user_error_exit_2_in_process(args) -> None:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
