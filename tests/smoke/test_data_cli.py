"""`rewardloop data import | export | stats` through the real CLI app, and one real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from rewardloop.cli import app

ROWS = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "annotator": "ann"},
        {"prompt": "capital of France?", "chosen": "Paris", "rejected": "Lyon"}]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_import_export_stats(tmp_path: Path) -> None:
    runner, db = CliRunner(), f"sqlite:///{tmp_path / 'cli.db'}"
    src = jsonl(tmp_path / "pairs.jsonl", ROWS)
    result = runner.invoke(app, ["data", "import", str(src), "--db", db, "--batch", "b1"])
    assert result.exit_code == 0, result.output
    assert "detected format: trl" in result.output
    assert "imported 2: 2 prompts, 4 responses, 2 tasks, 2 judgments" in result.output
    assert "duplicates skipped: 0" in result.output

    again = runner.invoke(app, ["data", "import", str(src), "--format", "trl", "--db", db])
    assert again.exit_code == 0 and "duplicates skipped: 2" in again.output
    assert "detected" not in again.output

    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["data", "export", "--format", "trl", "-o", str(out), "--db", db])
    assert result.exit_code == 0 and f"wrote 2 trl rows to {out}" in result.output
    assert [json.loads(line) for line in out.read_text().splitlines()] == ROWS

    result = runner.invoke(app, ["data", "stats", "--db", db, "--json"])
    stats = json.loads(result.output)
    assert stats["counts"]["judgments"] == 2 and stats["annotators"]["ann"]["judgments"] == 1
    text = runner.invoke(app, ["data", "stats", "--db", db])
    assert "tie rate: 0.0%" in text.output and "ann" in text.output


def test_bad_file_imports_nothing(tmp_path: Path) -> None:
    runner, db = CliRunner(), f"sqlite:///{tmp_path / 'cli.db'}"
    bad = jsonl(tmp_path / "bad.jsonl", [*ROWS, {"prompt": "p", "chosen": 3, "rejected": "x"}])
    result = runner.invoke(app, ["data", "import", str(bad), "--db", db])
    assert result.exit_code == 2
    assert "bad.jsonl:line 3 field 'chosen'" in result.stderr
    stats = json.loads(runner.invoke(app, ["data", "stats", "--db", db, "--json"]).output)
    assert set(stats["counts"].values()) == {0}


def test_real_process_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": oops}\n')
    exe = Path(sys.executable).parent / "rewardloop"
    proc = subprocess.run([str(exe), "data", "import", str(bad), "--db",
                           f"sqlite:///{tmp_path / 'x.db'}"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "bad.jsonl:line 2: not valid JSON" in lines[0] and "Traceback" not in proc.stderr
