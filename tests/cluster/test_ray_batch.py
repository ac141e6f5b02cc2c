"""``score --ray`` and ``generate --ray`` write the one-process output row for row, and a job
resumes from the chunks it saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.synthetic import candidate_rows, prompt_rows

pytestmark = [pytest.mark.xdist_group("ray")]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def invoke(*args: str) -> None:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output


def assert_same_scores(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-5)
        assert {k: v for k, v in x.items() if k != "scores"} == \
            {k: v for k, v in y.items() if k != "scores"}


@pytest.mark.slow
def test_score_on_ray_equals_one_process_and_resumes_from_saved_chunks(
        ray_cluster: object, work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rewardloop.cluster import batch

    data = tmp_path / "candidates.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in candidate_rows(10, k=3, seed=4)))
    args = ["score", "--rm", str(work / "rm"), "--data", str(data), "--batch-size", "2"]
    invoke(*args, "--out", str(tmp_path / "one.jsonl"))
    one = rows(tmp_path / "one.jsonl")
    # 30 answers in chunks of 16 (2 x CHUNK_BATCHES) over two actors.
    ray_args = [*args, "--ray", "local", "--actors", "2", "--actor-cpus", "0.5"]
    monkeypatch.setattr(batch.Parts, "remove", lambda self: None)  # keep the chunks
    invoke(*ray_args, "--out", str(tmp_path / "ray.jsonl"))
    assert_same_scores(one, rows(tmp_path / "ray.jsonl"))

    # An "interrupted" job: chunk 0 saved (with marked values, to see that it is reused),
    # chunk 1 lost. Running the command again computes only chunk 1.
    parts = tmp_path / ".ray.jsonl.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["000000.json", "000001.json", "job.json"]
    saved = json.loads((parts / "000000.json").read_text())
    (parts / "000000.json").write_text(json.dumps({**saved, "mean": [7.0] * 16}))
    (parts / "000001.json").unlink()
    (tmp_path / "ray.jsonl").unlink()
    monkeypatch.undo()
    ray_args[ray_args.index("--actors") + 1] = "1"  # the job's chunks, not its actors, count
    invoke(*ray_args, "--out", str(tmp_path / "ray.jsonl"))
    resumed = rows(tmp_path / "ray.jsonl")
    flat = [s for r in resumed for s in r["scores"]]
    assert flat[:16] == [7.0] * 16
    assert flat[16:] == pytest.approx([s for r in one for s in r["scores"]][16:], abs=1e-5)
    assert not parts.exists()

    # Saved chunks of another job are refused, not mixed in.
    parts.mkdir()
    (parts / "job.json").write_text(json.dumps({"kind": "other"}))
    res = CliRunner().invoke(app, [*ray_args, "--out", str(tmp_path / "ray.jsonl")])
    assert res.exit_code == 2 and "another job" in res.output


@pytest.mark.slow
def test_generate_on_ray_equals_one_process(ray_cluster: object, work: Path,
                                            tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(7, seed=5)))
    args = ["generate", "--policy", str(work / "tiny"), "--prompts", str(prompts), "-n", "3",
            "--max-new-tokens", "6", "--batch-size", "2", "--seed", "3"]
    invoke(*args, "--out", str(tmp_path / "one.jsonl"))
    invoke(*args, "--out", str(tmp_path / "ray.jsonl"), "--ray", "local", "--actors", "2",
           "--actor-cpus", "0.5")
    one = rows(tmp_path / "one.jsonl")
    assert len(one) == 7 and rows(tmp_path / "ray.jsonl") == one
    assert not (tmp_path / ".ray.jsonl.parts").exists()
