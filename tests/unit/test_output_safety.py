"""Nothing a user gave us is lost or half-written: an output that is an input, a directory where a
file goes (or a file where a directory goes), a run's own files, a directory of other files: each
is refused with exit 2 and one line, before any generation, and the user's files stay
byte-identical."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.errors import UserError
from rewardloop.util.files import atomic_file, atomic_write_text, check_output_file

GOLD = "rewardloop.synthetic:gold_score"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny policy, prompts, pairs, a GRPO-like run and an SFT-like run."""
    from rewardloop.synthetic import prompt_rows
    from rewardloop.tiny import build_tiny, generate_corpus

    root = tmp_path_factory.mktemp("safety")
    build_tiny(root / "tiny", generate_corpus(300), vocab_size=320, hidden_size=16,
               num_layers=1, num_heads=2, max_position=128)
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(2)))
    (root / "pairs.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a b",
                                                  "rejected": "c"}) + "\n")
    grpo = root / "runs" / "g"
    grpo.mkdir(parents=True)
    for name, text in (("config.yaml", "lr: 0.001\n"), ("metrics.jsonl", '{"step": 1}\n'),
                       ("samples.jsonl", '{"step": 1, "completion": "mine"}\n'),
                       ("summary.json", '{"steps": 1}\n')):
        (grpo / name).write_text(text)
    return root


def snapshot(*paths: Path) -> dict[Path, bytes]:
    """Every file under ``paths`` with its bytes."""
    files = [p for path in paths for p in ([path] if path.is_file() else path.rglob("*"))]
    return {p: p.read_bytes() for p in files if p.is_file()}


def refused(args: list[str], *words: str) -> str:
    """Run the CLI; assert exit 2, one error line naming ``words``, no traceback."""
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    for word in words:
        assert word in res.output, res.output
    return res.output


# -- the central checks -------------------------------------------------------------------------


def test_atomic_file_refuses_a_directory_and_a_missing_parent(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("keep\n")
    with pytest.raises(UserError, match="is a directory"), atomic_file(tmp_path / "d"):
        pass
    with pytest.raises(UserError, match="does not exist"):
        atomic_write_text(tmp_path / "nope" / "x.txt", "x")
    assert (tmp_path / "d" / "keep.txt").read_text() == "keep\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary file left


def test_an_input_is_never_an_output_also_through_a_link(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(data)
    os.link(data, tmp_path / "hard.jsonl")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "part.jsonl").write_text("{}\n")
    for out in ("data.jsonl", "link.jsonl", "hard.jsonl"):
        with pytest.raises(UserError, match="would overwrite the input"):
            check_output_file(tmp_path / out, inputs=[data])
    with pytest.raises(UserError, match="would overwrite the input"):
        check_output_file(tmp_path / "ds" / "part.jsonl", inputs=[f"{tmp_path / 'ds'}:train"])
    # A new file, a hub id and an absent input are fine.
    assert check_output_file(tmp_path / "new.jsonl", inputs=[data, "org/model", None])


# -- generate, score, report: an output that is an input or a directory -------------------------


def test_generate_refuses_its_prompts_a_directory_and_the_policy_files(root: Path) -> None:
    before = snapshot(root / "prompts.jsonl", root / "tiny", root / "runs")
    base = ["generate", "--policy", str(root / "tiny"), "--prompts", str(root / "prompts.jsonl"),
            "-n", "2", "--max-new-tokens", "2", "--out"]
    refused([*base, str(root / "prompts.jsonl")], "would overwrite the input")
    refused([*base, str(root / "runs")], "is a directory")
    refused([*base, str(root / "tiny" / "config.json")], "would overwrite the input")
    assert snapshot(root / "prompts.jsonl", root / "tiny", root / "runs") == before


def test_score_refuses_its_data_and_a_directory(root: Path, tmp_path: Path) -> None:
    before = snapshot(root / "pairs.jsonl")
    base = ["score", "--rm", str(root / "tiny"), "--data", str(root / "pairs.jsonl"), "-o"]
    refused([*base, str(root / "pairs.jsonl")], "would overwrite the input")
    refused([*base, str(tmp_path)], "is a directory")
    assert snapshot(root / "pairs.jsonl") == before


def test_report_refuses_a_run_file_a_directory_and_a_directory_that_is_no_run(
        root: Path, tmp_path: Path) -> None:
    run = root / "runs" / "g"
    before = snapshot(root / "runs")
    refused(["report", str(run), "-o", str(run / "summary.json")], "no earlier report")
    refused(["report", str(run), "-o", str(run / "notes.txt")], ".html")
    refused(["report", str(run), "-o", str(tmp_path)], "is a directory")
    refused(["report", str(root / "tiny"), "-o", str(tmp_path / "r.html")],
            "not a run directory", "summary.json")
    assert not (tmp_path / "r.html").exists()
    assert snapshot(root / "runs") == before


def test_report_may_write_and_rewrite_its_own_file_inside_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"steps": 1}\n')
    for _ in range(2):  # the second time over the earlier report
        res = CliRunner().invoke(app, ["report", str(run), "-o", str(run / "report.html")])
        assert res.exit_code == 0, res.output
    assert (run / "report.html").read_text().startswith("<!doctype html>")
    (run / "mine.html").write_text("<html>my notes</html>")
    refused(["report", str(run), "-o", str(run / "mine.html")], "no earlier report")
    assert (run / "mine.html").read_text() == "<html>my notes</html>"


def test_report_replaces_a_file_outside_a_run_only_if_it_is_a_report_or_with_overwrite(
        tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"steps": 1}\n')
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    mine = tmp_path / "mine.html"
    mine.write_text("<html>my notes</html>")
    for out in (data, mine):
        refused(["report", str(run), "-o", str(out)], str(out), "not a report", "--overwrite")
    assert data.read_text() == '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
    assert mine.read_text() == "<html>my notes</html>"
    report = tmp_path / "report.html"
    for args in ([], [], ["--overwrite"]):  # new, then over its own report, then forced
        res = CliRunner().invoke(app, ["report", str(run), "-o", str(report), *args])
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["report", str(run), "-o", str(mine), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert mine.read_text().startswith("<!doctype html>")
    # Inside a run, --overwrite still never replaces the run's own files.
    refused(["report", str(run), "-o", str(run / "summary.json"), "--overwrite"],
            "no earlier report")
    assert (run / "summary.json").read_text() == '{"steps": 1}\n'


# -- eval: --out is checked before generation; --overwrite replaces only eval's files -----------


def eval_args(root: Path, out: Path, *extra: str) -> list[str]:
    tiny = str(root / "tiny")
    return ["eval", "--policy", tiny, "--baseline", tiny, "--prompts",
            str(root / "prompts.jsonl"), "--judge", GOLD, "--max-new-tokens", "2",
            "--n-boot", "10", "--device", "cpu", "--out", str(out), *extra]


def test_eval_refuses_a_training_run_and_a_file_before_generating(root: Path) -> None:
    before = snapshot(root / "runs", root / "prompts.jsonl")
    refused(eval_args(root, root / "runs" / "g"), "holds no earlier eval")
    refused(eval_args(root, root / "runs" / "g", "--overwrite"), "holds no earlier eval")
    refused(eval_args(root, root / "prompts.jsonl"), "is a file, not a directory")
    refused(eval_args(root, root / "prompts.jsonl" / "sub"), "is a file, not a directory")
    assert snapshot(root / "runs", root / "prompts.jsonl") == before


def test_eval_replaces_an_earlier_eval_only_with_overwrite_and_only_its_files(
        root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    res = CliRunner().invoke(app, eval_args(root, out))
    assert res.exit_code == 0, res.output
    (out / "notes.md").write_text("mine\n")
    (out / "eval.json").write_text('{"earlier": true}\n')
    before = snapshot(out)
    refused(eval_args(root, out), "holds an earlier eval", "--overwrite")
    assert snapshot(out) == before
    res = CliRunner().invoke(app, eval_args(root, out, "--overwrite"))
    assert res.exit_code == 0, res.output
    assert "earlier" not in json.loads((out / "eval.json").read_text())
    assert (out / "notes.md").read_text() == "mine\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "eval.json", "notes.md",
                                                      "samples.jsonl", "summary.json"]
    # An eval interrupted before eval.json (its last file) is an earlier eval too.
    (out / "eval.json").unlink()
    refused(eval_args(root, out), "holds an earlier eval", "--overwrite")


def test_an_overwrite_killed_part_way_never_reads_as_finished(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit s12 crash F2: a kill after the new samples.jsonl left the old eval.json (the mark
    of a finished eval) describing another policy's answers. The old mark goes first."""
    import rewardloop.eval.evaluate as E

    out = tmp_path / "ev"
    res = CliRunner().invoke(app, eval_args(root, out))
    assert res.exit_code == 0, res.output
    written = E._write_samples

    def killed_after_samples(*args: Any, **kwargs: Any) -> None:
        written(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "_write_samples", killed_after_samples)
    res = CliRunner().invoke(app, eval_args(root, out, "--overwrite"))
    assert res.exit_code == 130, res.output
    assert not (out / "eval.json").exists() and (out / "samples.jsonl").is_file()


def test_eval_never_takes_a_loops_work_directory_for_an_earlier_eval(root: Path,
                                                                      tmp_path: Path) -> None:
    """A loop's work directory holds config.yaml (what resumes it) and summary.json, as an
    eval's output does: --overwrite must not replace them."""
    workdir = tmp_path / "loop"
    (workdir / "round-1").mkdir(parents=True)
    (workdir / "config.yaml").write_text("policy: p\n")
    (workdir / "summary.json").write_text('{"rounds": 1}\n')
    before = snapshot(workdir)
    refused(eval_args(root, workdir, "--overwrite"), "holds no earlier eval")
    (workdir / ".rewardloop-workdir").write_text("loop\n")
    (workdir / "samples.jsonl").write_text("{}\n")
    refused(eval_args(root, workdir, "--overwrite"), "holds no earlier eval")
    (workdir / "samples.jsonl").unlink()
    (workdir / ".rewardloop-workdir").unlink()
    assert snapshot(workdir) == before


# -- data export --to-hf-dataset replaces only its own export --------------------------------


@pytest.fixture
def db(root: Path, tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    res = CliRunner().invoke(app, ["data", "import", str(root / "pairs.jsonl"), "--db", url])
    assert res.exit_code == 0, res.output
    return url


def test_export_refuses_a_directory_it_did_not_write(db: str, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "state.json").write_text("{}\n")
    (ds / "README.md").write_text("n\n")
    (ds / "pairs.jsonl").write_text("{}\n")
    before = snapshot(ds)
    export = ["data", "export", "--format", "trl", "--db", db, "--to-hf-dataset"]
    refused([*export, str(ds)], "not an earlier rewardloop export")
    assert snapshot(ds) == before
    refused(["data", "export", "--format", "trl", "--db", db, "-o", str(ds)], "is a directory")
    (tmp_path / "d.parquet").mkdir()
    refused(["data", "export", "--format", "trl", "--db", db, "-o", str(tmp_path / "d.parquet")],
            "is a directory")
    refused(["data", "export", "--format", "trl", "--db", db, "-o", str(ds / "x.parquet" / "y")],
            "does not exist")
    assert snapshot(ds) == before

    mine = tmp_path / "mine"
    for _ in range(2):  # a new directory, then over its own earlier export
        res = CliRunner().invoke(app, [*export, str(mine)])
        assert res.exit_code == 0, res.output
    (mine / "README.md").write_text("about this export\n")
    refused([*export, str(mine)], "also holds README.md")
    assert (mine / "README.md").read_text() == "about this export\n"


# -- directories where files are, and flags out of range -----------------------------------------


def test_workdirs_and_tiny_out_that_are_files(root: Path) -> None:
    prompts = root / "prompts.jsonl"
    before = snapshot(prompts)
    refused(["demo", "--workdir", str(prompts)], "is a file, not a directory")
    refused(["loop", "--workdir", str(prompts), "--policy", str(root / "tiny"), "--prompts",
             str(prompts)], "is a file, not a directory")
    refused(["tiny", "--out", str(prompts)], "is a file, not a directory")
    assert snapshot(prompts) == before


def test_tiny_names_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    bad = tmp_path / "texts.txt"
    bad.write_bytes(b"caf\xe9 au lait\n")
    refused(["tiny", "--out", str(tmp_path / "t"), "--texts", str(bad)], str(bad), "UTF-8")
    assert not (tmp_path / "t").exists()


def test_serve_refuses_an_unknown_log_level_before_making_the_store(tmp_path: Path) -> None:
    refused(["serve", "--db", f"sqlite:///{tmp_path / 's.db'}", "--log-level", "loud"],
            "--log-level must be one of", "debug")
    assert not (tmp_path / "s.db").exists()


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_serve_on_a_taken_port_says_so_without_claiming_to_serve(tmp_path: Path,
                                                                 taken_port: int) -> None:
    out = refused(["serve", "--db", f"sqlite:///{tmp_path / 's.db'}", "--port",
                   str(taken_port)], f"cannot listen on 127.0.0.1:{taken_port}")
    assert "serving" not in out


# -- input files that are not UTF-8 text, or are directories ------------------------------------


def test_tasks_create_and_users_add_name_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    db_file = tmp_path / "s.db"
    db = f"sqlite:///{db_file}"
    good = tmp_path / "cands.jsonl"
    good.write_text(json.dumps({"prompt": "q", "responses": ["a", "b"]}) + "\n")
    bad = tmp_path / "utf16.jsonl"
    bad.write_bytes(json.dumps({"prompt": "q", "responses": ["a", "b"]}).encode("utf-16"))
    latin = tmp_path / "guide.md"
    latin.write_bytes("# Guide\nPr\u00e9f\u00e9rez la r\u00e9ponse\n".encode("latin-1"))
    refused(["tasks", "create", str(bad), "--db", db],
            f"{bad}:line 1: not UTF-8 text (bad byte at column 1)")
    refused(["tasks", "create", str(good), "--gold", str(bad), "--db", db],
            f"{bad}:line 1: not UTF-8 text")
    refused(["tasks", "create", str(good), "--guidelines", str(latin), "--db", db],
            f"--guidelines {latin}:line 2: not UTF-8 text (bad byte at column 3)")
    refused(["users", "add", "frank", "--role", "annotator", "--password-file", str(latin),
             "--db", db], "--password-file", "not UTF-8 text")
    assert not db_file.exists()  # refused before the store was opened


def test_tasks_create_and_users_add_name_a_directory_given_for_a_file(tmp_path: Path) -> None:
    db_file = tmp_path / "s.db"
    db = f"sqlite:///{db_file}"
    good = tmp_path / "cands.jsonl"
    good.write_text(json.dumps({"prompt": "q", "responses": ["a", "b"]}) + "\n")
    refused(["tasks", "create", str(tmp_path), "--db", db], "is a directory")
    refused(["tasks", "create", str(good), "--gold", str(tmp_path), "--db", db],
            f"--gold {tmp_path} is a directory")
    refused(["tasks", "create", str(good), "--guidelines", str(tmp_path), "--db", db],
            f"--guidelines {tmp_path} is a directory")
    refused(["users", "add", "frank", "--role", "annotator", "--password-file", str(tmp_path),
             "--db", db], f"--password-file {tmp_path} is a directory")
    assert not db_file.exists()


def test_a_utf8_password_file_and_guidelines_with_a_bom_are_read_without_it(
        tmp_path: Path) -> None:
    from rewardloop.cli.tasks import read_text_file

    path = tmp_path / "pw.txt"
    path.write_bytes("\ufeffs\u00e9cret-pass\n".encode())
    assert read_text_file(path, "--password-file") == "s\u00e9cret-pass\n"


def test_an_export_replacing_an_earlier_one_never_leaves_its_name_missing(
        db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit s12 crash F6: replacing by two renames left the data only in a hidden directory
    when a kill landed between them. On Linux the two directories are swapped in one step: no
    rename of the earlier export happens at all, and its name always holds an export."""
    pytest.importorskip("pyarrow")
    import sys

    from rewardloop.util.files import exchange_paths

    if not sys.platform.startswith("linux"):
        pytest.skip("the atomic swap is Linux's renameat2")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("A")
    assert exchange_paths(a, b) and (b / "x").read_text() == "A" and not (a / "x").exists()
    export = ["data", "export", "--format", "trl", "--db", db, "--to-hf-dataset"]
    mine = tmp_path / "mine"
    assert CliRunner().invoke(app, [*export, str(mine)]).exit_code == 0
    first = snapshot(mine)
    real_rename = Path.rename

    def rename(self: Path, target: str | Path) -> Path:
        assert self != mine, "the earlier export was renamed away"
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    res = CliRunner().invoke(app, [*export, str(mine)])
    assert res.exit_code == 0, res.output
    assert snapshot(mine).keys() == first.keys() and snapshot(mine) != first  # a new export
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
