"""``score``: every written score checked against a direct, unbatched model call; ensembles add
their std; normalisation uses reward_stats.json; wrong data kinds exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.score import RewardScorer, resolve_rm_dir, text_form
from rewardloop.synthetic import candidate_rows, corpus_texts, preference_rows, sft_rows
from rewardloop.tiny import build_tiny
from rewardloop.tokenize import encode
from rewardloop.train.reward import RewardConfig, train_rm


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rm_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Reward-model run dirs after one training step: a single head and a 2-head ensemble."""
    tmp = tmp_path_factory.mktemp("rm")
    tiny = build_tiny(tmp / "tiny", corpus_texts(100), vocab_size=300, hidden_size=16,
                      num_layers=1, num_heads=2, max_position=128)
    data = _write(tmp / "pairs.jsonl", preference_rows(4, seed=1))
    runs = {}
    for heads in (1, 2):
        runs[heads] = tmp / f"run{heads}"
        train_rm(RewardConfig(model=str(tiny), data=data, out=runs[heads], max_steps=1,
                              batch_size=4, lr=1e-2, max_length=64, device="cpu",
                              ensemble=heads))
    return runs


def _direct(model_dir: Path, prompt: str, answer: str) -> torch.Tensor:
    """The reward of one unpadded sequence through the plain transformers classifier: (K,)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    ids = encode(tokenizer, prompt, answer, max_length=64).input_ids
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_scores_match_direct_model_calls_row_by_row(rm_runs: dict[int, Path],
                                                    tmp_path: Path) -> None:
    run = rm_runs[1]
    pairs = _write(tmp_path / "pairs.jsonl", [{**r, "extra": i}
                                              for i, r in enumerate(preference_rows(3, seed=9))])
    cands = _write(tmp_path / "cands.jsonl", candidate_rows(2, k=3, seed=9))
    single = _write(tmp_path / "sft.jsonl", sft_rows(3, seed=9))
    for data, check in ((pairs, "pairs"), (cands, "cands"), (single, "single")):
        out = tmp_path / f"{check}.out.jsonl"
        res = CliRunner().invoke(app, ["score", "--rm", str(run), "--data", str(data),
                                       "-o", str(out), "--batch-size", "2"])
        assert res.exit_code == 0, res.output
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(rows) == len(data.read_text().splitlines())
        for row in rows:
            model_dir = run / "model"
            if check == "pairs":
                assert "extra" in row  # the input row is kept, scores added
                for key in ("chosen", "rejected"):
                    want = float(_direct(model_dir, row["prompt"], row[key])[0])
                    assert row[f"score_{key}"] == pytest.approx(want, abs=1e-5)
                assert "score_chosen_std" not in row
            elif check == "cands":
                want = [float(_direct(model_dir, row["prompt"], a)[0]) for a in row["responses"]]
                assert row["scores"] == pytest.approx(want, abs=1e-5)
            else:
                want = float(_direct(model_dir, row["prompt"], row["completion"])[0])
                assert row["score"] == pytest.approx(want, abs=1e-5)


def test_ensemble_scores_carry_the_std_across_heads(rm_runs: dict[int, Path],
                                                    tmp_path: Path) -> None:
    run = rm_runs[2]
    rows = preference_rows(2, seed=3)
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["score", "--rm", str(run / "model"), "--data",
                                   str(_write(tmp_path / "p.jsonl", rows)), "-o", str(out)])
    assert res.exit_code == 0, res.output
    for row in (json.loads(x) for x in out.read_text().splitlines()):
        heads = _direct(run / "model", row["prompt"], row["chosen"])
        assert heads.shape == (2,)
        assert row["score_chosen"] == pytest.approx(float(heads.mean()), abs=1e-5)
        assert row["score_chosen_std"] == pytest.approx(float(heads.std(unbiased=False)),
                                                        abs=1e-5)


def test_normalisation_uses_reward_stats(rm_runs: dict[int, Path]) -> None:
    run = rm_runs[1]
    stats = json.loads((run / "model" / "reward_stats.json").read_text())
    raw = RewardScorer(run, device="cpu").score(["Hi, refund?"], ["Your refund is approved."])
    norm = RewardScorer(run, device="cpu", normalize=True)(["Hi, refund?"],
                                                           ["Your refund is approved."])
    assert norm[0] == pytest.approx((raw[0] - stats["mean"]) / stats["std"], rel=1e-5)
    assert resolve_rm_dir(run) == run / "model"


def test_wrong_data_kinds_and_paths_exit_2(rm_runs: dict[int, Path], tmp_path: Path) -> None:
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "Where is my parcel?"}])
    base = ["score", "--rm", str(rm_runs[1]), "-o", str(tmp_path / "o.jsonl")]
    res = CliRunner().invoke(app, [*base, "--data", str(prompts)])
    assert res.exit_code == 2 and "no answers to score" in res.output
    texts = _write(tmp_path / "text.jsonl", [{"text": "just text"}])
    res = CliRunner().invoke(app, [*base, "--data", str(texts)])
    assert res.exit_code == 2 and "only 'text'" in res.output
    res = CliRunner().invoke(app, [*base, "--data", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "no such file" in res.output
    pairs = _write(tmp_path / "pairs.jsonl", preference_rows(1))
    res = CliRunner().invoke(app, ["score", "--rm", str(tmp_path), "--data", str(pairs),
                                   "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "neither a reward-model directory" in res.output
    assert not (tmp_path / "o.jsonl").exists()


def test_parquet_rows_score_like_their_jsonl(rm_runs: dict[int, Path], tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = preference_rows(3, seed=5)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    outs = []
    for data in (_write(tmp_path / "pairs.jsonl", rows), tmp_path / "pairs.parquet"):
        out = tmp_path / f"{data.name}.out.jsonl"
        res = CliRunner().invoke(app, ["score", "--rm", str(rm_runs[1]), "--data", str(data),
                                       "-o", str(out)])
        assert res.exit_code == 0, res.output
        outs.append([json.loads(x) for x in out.read_text().splitlines()])
    assert outs[0] == outs[1] and len(outs[0]) == 3 and "score_chosen" in outs[0][0]


def test_the_form_trained_on_is_saved_and_scoring_another_is_flagged_once(
        rm_runs: dict[int, Path], caplog: pytest.LogCaptureFixture) -> None:
    chat = [{"role": "user", "content": "hi"}]
    assert text_form([("a", "b"), ("c", "d")]) == "text"
    assert text_form([(chat, "b"), ("a", [{"role": "assistant", "content": "x"}])]) == "chat"
    assert text_form([(chat, "b"), ("a", "b")]) == "mixed" and text_form([]) is None
    stats = json.loads((rm_runs[1] / "model" / "reward_stats.json").read_text())
    assert stats["text_form"] == "text"  # preference_rows are text
    scorer = RewardScorer(rm_runs[1], device="cpu")
    with caplog.at_level("WARNING"):
        scorer.score(["hi"], ["hello"])
    assert "trained on text rows" not in caplog.text
    with caplog.at_level("WARNING"):
        scorer.score([chat, chat], ["hello", "x"])
        scorer.score([chat], ["again"])
    assert caplog.text.count("trained on text rows but is scoring chat rows") == 1
