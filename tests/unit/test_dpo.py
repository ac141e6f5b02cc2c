"""DPO/KTO trainer pieces: masking edge cases against hand-computed log-probs, config checks,
KTO's mismatched pairs, the RPO term, and the CLI's user errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.data.records import PairRecord, UnpairedRecord
from rewardloop.errors import UserError
from rewardloop.losses import PREFERENCE_LOSSES, nll_loss
from rewardloop.synthetic import corpus_texts, preference_rows
from rewardloop.tiny import build_tiny
from rewardloop.train import dpo
from rewardloop.train.configs import DPO_LOSSES
from rewardloop.train.dpo import DPOConfig
from rewardloop.train.dpo_objectives import OBJECTIVES, Example, build_pairs, build_unpaired, score


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny(out, corpus_texts(100), vocab_size=300, hidden_size=16, num_layers=1,
                      num_heads=2, max_position=96)


@pytest.fixture(scope="module")
def tok_model(tiny_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    return AutoTokenizer.from_pretrained(tiny_dir), model


def _cfg(tmp: Path, **kw) -> DPOConfig:
    return DPOConfig(model="m", data=tmp / "d.jsonl", out=tmp / "o", **kw)


def _hand_logp(model, ids: list[int], mask: list[int]) -> float:
    """Σ_t log softmax(logits[t-1])[ids[t]] over completion positions, one unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
    logp = torch.log_softmax(logits.double(), dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t])


def test_masking_edge_cases_match_hand_computed_logps(tok_model, tmp_path: Path) -> None:
    tokenizer, model = tok_model
    eos = tokenizer.eos_token_id
    long_prompt = "Hi, my package has not arrived and the delivery is two weeks late. " * 2
    long_answer = "I have sent a new parcel today with express delivery at no cost. " * 4
    cfg = _cfg(tmp_path, max_length=40, max_prompt_length=24)
    pairs = [
        PairRecord(long_prompt, "Sorry.", ""),  # prompt longer than the answer; empty answer
        PairRecord("Refund?", long_answer, "No."),  # answer cut at max length: no EOS
    ]
    (short, empty), (cut, short2) = [(e.first, e.second) for e in build_pairs(pairs, tokenizer,
                                                                             cfg)]
    # Prompt longer than max_prompt_length: cut from the left, the end of the prompt kept.
    full_prompt = tokenizer(long_prompt)["input_ids"]
    assert short.prompt_len == 24 and short.input_ids[:24] == full_prompt[-24:]
    # Empty answer: only its EOS is trained on.
    assert empty.completion_mask == [0] * 24 + [1] and empty.input_ids[-1] == eos
    assert empty.has_eos and short.has_eos and short.input_ids[-1] == eos
    # Answer reaching max_length: cut, no EOS, every kept answer token in the mask.
    assert len(cut) == 40 and not cut.has_eos and eos not in cut.input_ids
    assert sum(cut.completion_mask) == 40 - cut.prompt_len
    # Scored in one padded (2B, T) batch == scored alone, unpadded, by hand.
    examples = [Example(short, empty), Example(cut, short2)]
    got = score(model, examples, tokenizer.pad_token_id, average=False)  # (2, 2)
    want = [[_hand_logp(model, e.input_ids, e.completion_mask) for e in (ex.first, ex.second)]
            for ex in examples]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    mean = score(model, examples, tokenizer.pad_token_id, average=True)
    counts = torch.tensor([[sum(e.first.completion_mask), sum(e.second.completion_mask)]
                           for e in examples], dtype=torch.float32)
    torch.testing.assert_close(mean * counts, got, rtol=1e-5, atol=1e-5)


def test_ties_are_left_out(tok_model, tmp_path: Path) -> None:
    tokenizer, _ = tok_model
    pairs = [PairRecord("p", "a", "b"), PairRecord("p", "c", "d", tie=True)]
    assert len(build_pairs(pairs, tokenizer, _cfg(tmp_path))) == 1


def test_kto_partners_are_other_rows_and_fixed_by_seed(tok_model, tmp_path: Path) -> None:
    tokenizer, _ = tok_model
    rows = [UnpairedRecord(f"prompt {i}", f"answer number {i}", i % 2 == 0) for i in range(6)]
    cfg = _cfg(tmp_path, loss="kto", max_length=32)
    examples = build_unpaired(rows, tokenizer, cfg)
    assert [e.label for e in examples] == [r.label for r in rows]
    for e in examples:
        # Same prompt as its row, completion of another row; every row is used once.
        assert e.second.input_ids[:e.second.prompt_len] == e.first.input_ids[:e.first.prompt_len]
        assert e.second.input_ids[e.second.prompt_len:] != e.first.input_ids[e.first.prompt_len:]
    answers = sorted(tuple(e.second.input_ids[e.second.prompt_len:]) for e in examples)
    assert answers == sorted(tuple(e.first.input_ids[e.first.prompt_len:]) for e in examples)
    again = build_unpaired(rows, tokenizer, cfg)
    assert [e.second for e in again] == [e.second for e in examples]
    with pytest.raises(UserError, match="at least 2"):
        build_unpaired(rows[:1], tokenizer, cfg)


def test_every_loss_has_an_objective_and_the_loop_picks_it_by_name() -> None:
    assert set(OBJECTIVES) == set(PREFERENCE_LOSSES) | {"kto", "simpo", "orpo"} \
        == set(DPO_LOSSES)
    assert [n for n, o in OBJECTIVES.items() if not o.reference] == ["simpo", "orpo"]
    assert {n: o.sft_weight for n, o in OBJECTIVES.items() if o.sft_weight} == {"orpo": 1.0}
    assert OBJECTIVES["kto"].formats == ("kto",)
    assert OBJECTIVES["ipo"].formats == ("trl", "hh", "ultrafeedback")


@pytest.mark.parametrize("kw, match", [
    ({"loss": "cdpo"}, "cdpo needs"),
    ({"loss": "ipo", "label_smoothing": 0.1}, "no label smoothing"),
    ({"loss": "kto", "nll_coef": 1.0}, "pairwise"),
    ({"batch_size": 6, "grad_accum": 4}, "multiple of grad_accum"),
    ({"loss": "sppo"}, "loss must be one of"),
    ({"loss": "orpo", "nll_coef": 1.0}, "already adds the chosen answers' NLL"),
    ({"loss": "orpo", "label_smoothing": 0.1}, "no label smoothing"),
    ({"loss": "simpo", "ref_model": "ref"}, "uses no reference model"),
    ({"loss": "orpo", "precompute_ref": False}, "uses no reference model"),
    ({"loss": "simpo", "simpo_gamma": -1.0}, "simpo_gamma"),
    ({"beta": 0.0}, "beta"),
    ({"max_length": 16, "max_prompt_length": 16}, "max_prompt_length"),
    ({"lora_r": 0}, "lora_r must be at least 1"),
])
def test_config_is_validated(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, **kw)


def test_simpo_and_orpo_always_use_mean_log_probs(tmp_path: Path) -> None:
    assert _cfg(tmp_path, loss="simpo").mean_logps
    assert _cfg(tmp_path, loss="orpo").mean_logps
    assert not _cfg(tmp_path, loss="dpo").mean_logps
    # IPO's target margin 1/(2β) is per token (its authors, TRL): mean log-probs by default.
    assert _cfg(tmp_path, loss="ipo").mean_logps
    assert not _cfg(tmp_path, loss="ipo", length_normalize=False).mean_logps
    assert _cfg(tmp_path, loss="dpo", length_normalize=True).mean_logps
    # A dpo run's saved config.yaml (length_normalize as given: None) reused with --loss ipo
    # gets ipo's default; an old one that saved false does not stop simpo (review s14 L3).
    assert _cfg(tmp_path, loss="dpo").length_normalize is None
    assert _cfg(tmp_path, loss="simpo", length_normalize=False).mean_logps


def test_rpo_term_is_the_token_mean_nll_of_the_chosen(tok_model, tmp_path: Path) -> None:
    tokenizer, model = tok_model
    cfg = _cfg(tmp_path, max_length=48)
    rows = preference_rows(3, seed=3)
    examples = build_pairs([PairRecord(r["prompt"], r["chosen"], r["rejected"]) for r in rows],
                           tokenizer, cfg)
    chosen = [e.first for e in examples]
    tokens = sum(sum(c.completion_mask) for c in chosen)
    per_token = [_hand_logp(model, c.input_ids, c.completion_mask) for c in chosen]
    want = -sum(per_token) / tokens
    for average in (False, True):
        logps = score(model, examples, tokenizer.pad_token_id, average)[:, 0]
        got = dpo._nll(logps, examples, average, float(tokens)).detach()
        assert abs(float(got) - want) < 1e-4
    # The same number through losses.nll_loss on a hand-built per-token tensor.
    flat = torch.tensor([per_token])
    assert abs(float(nll_loss(flat, torch.ones_like(flat), global_tokens=tokens)[0]) - want) \
        < 1e-6


# ----------------------------------------------------------------------------- the CLI


def _refused(res) -> str:
    """The one-line error of a refused command (exit status 2, no traceback)."""
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_refuses_the_wrong_data_kind(tiny_dir: Path, tmp_path: Path) -> None:
    kto = _write(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": True}] * 2)
    res = CliRunner().invoke(app, ["train", "dpo", "--model", str(tiny_dir), "--data", str(kto),
                                   "--out", str(tmp_path / "run")])
    error = _refused(res)
    assert "holds kto rows" in error and "--loss kto" in error
    pairs = _write(tmp_path / "pairs.jsonl", preference_rows(2))
    res = CliRunner().invoke(app, ["train", "dpo", "--model", str(tiny_dir), "--data",
                                   str(pairs), "--loss", "kto", "--out", str(tmp_path / "run")])
    assert "unpaired" in _refused(res)
    assert not (tmp_path / "run").exists()  # nothing written for a refused run


def test_cli_refuses_pad_equal_to_eos(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model = tmp_path / "pad_is_eos"
    shutil.copytree(tiny_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(model)
    pairs = _write(tmp_path / "pairs.jsonl", preference_rows(2))
    res = CliRunner().invoke(app, ["train", "dpo", "--model", str(model), "--data", str(pairs),
                                   "--out", str(tmp_path / "run")])
    error = _refused(res)
    assert "as the pad token" in error and "--add-pad-token" in error


def test_cli_refuses_bad_flags_before_loading_anything(tiny_dir: Path, tmp_path: Path) -> None:
    pairs = _write(tmp_path / "pairs.jsonl", preference_rows(2))
    base = ["train", "dpo", "--model", str(tiny_dir), "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(app, [*base, "--data", str(pairs), "--loss", "cdpo"])
    assert "label-smoothing" in _refused(res)
    res = CliRunner().invoke(app, [*base, "--data", str(tmp_path / "missing.jsonl")])
    assert "no such file" in _refused(res)


def test_cli_help_explains_every_flag() -> None:
    res = CliRunner().invoke(app, ["train", "dpo", "--help"])
    assert res.exit_code == 0
    for flag in ("--loss", "--beta", "--label-smoothing", "--length-normalize", "--nll-coef",
                 "--desirable-weight", "--undesirable-weight", "--ref-model", "--lora-r",
                 "--grad-accum", "--max-prompt-length", "--resume", "--eval-data"):
        assert flag in res.output


def test_shard_scores_puts_each_batchs_scores_back_in_data_order() -> None:
    """The reference is scored in batches of similar length (dealt over the ranks): each row of
    the result must be its own example's, whatever order the batches took."""
    from rewardloop.options import RuntimeOptions
    from rewardloop.tokenize import Encoded
    from rewardloop.train.runtime import Runtime

    def example(n: int) -> Example:
        enc = Encoded(list(range(n)), [1] * n, 0, True)
        return Example(enc, enc)

    examples = [example(n) for n in (5, 2, 9, 1, 7, 3, 8)]
    seen: list[int] = []

    def scorer(batch: list[Example]) -> torch.Tensor:
        seen.append(len(batch))
        return torch.tensor([[float(len(e.first)), -float(len(e.second))] for e in batch])

    out = dpo.shard_scores(scorer, examples, 3, Runtime(RuntimeOptions(), device="cpu"))
    assert out[:, 0].tolist() == [5.0, 2.0, 9.0, 1.0, 7.0, 3.0, 8.0]
    assert out[:, 1].tolist() == [-5.0, -2.0, -9.0, -1.0, -7.0, -3.0, -8.0]
    assert seen == [3, 3, 1]
    assert dpo.shard_scores(scorer, [], 3, Runtime(RuntimeOptions(), device="cpu")).shape == (0, 2)


def test_a_resume_reuses_the_reference_cache_only_for_the_same_pairs(
        tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Review s13 L4: the cache was matched by the options and the splits' lengths, so a resume
    whose --data (or --exclude-flagged) gave as many other pairs read the old pairs' values."""
    import logging

    data = _write(tmp_path / "pairs.jsonl", preference_rows(8, seed=0))
    common = {"model": str(tiny_dir), "data": data, "out": tmp_path / "run", "max_length": 64,
              "batch_size": 4, "device": "cpu", "save_every": 1}
    dpo.train_dpo(DPOConfig(**common, max_steps=2))  # a whole epoch: every pair scored
    with caplog.at_level(logging.INFO, logger="rewardloop.train.dpo"):
        dpo.train_dpo(DPOConfig(**common, max_steps=3, resume=True))
    assert "read cached reference log-probs" in caplog.text
    caplog.clear()
    _write(data, preference_rows(8, seed=1))  # as many pairs, other ones
    with caplog.at_level(logging.INFO, logger="rewardloop.train.dpo"):
        dpo.train_dpo(DPOConfig(**common, max_steps=4, resume=True))
    assert "read cached reference log-probs" not in caplog.text


def test_a_short_run_scores_the_reference_only_on_the_pairs_it_draws(
        tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Scale audit s14 #5: --max-steps under an epoch scored every pair before step 1. Now
    only the scoring batches holding a pair the steps draw are scored (all held-out pairs
    too), each pair to the very number a full scoring gives it; a resume to a longer run scores
    what it lacks from the initial model and ends where the longer run ends."""
    import logging

    data = _write(tmp_path / "pairs.jsonl", preference_rows(48, seed=0))
    common = {"model": str(tiny_dir), "data": data, "max_length": 64, "batch_size": 4,
              "device": "cpu", "save_every": 1, "eval_fraction": 0.25, "seed": 3,
              "ref_batch_size": 2, "schedule": "constant"}

    def losses(out: Path) -> list[float]:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    def cache(out: Path) -> dict[str, torch.Tensor]:
        return torch.load(out / "ref_logps.pt", weights_only=True)

    run = tmp_path / "short"
    with caplog.at_level(logging.INFO, logger="rewardloop.train.dpo"):
        dpo.train_dpo(DPOConfig(**common, out=run, max_steps=1))
    n_train = len(cache(run)["train"])
    assert f"scoring the reference on the 4 of {n_train} train pairs" in caplog.text
    scored = (~cache(run)["train"].isnan().any(dim=1)).nonzero().flatten().tolist()
    assert 4 <= len(scored) <= 8 and not cache(run)["eval"].isnan().any()
    full = tmp_path / "full"
    dpo.train_dpo(DPOConfig(**common, out=full, max_steps=n_train // 4))  # a whole epoch
    assert torch.equal(cache(run)["train"][scored], cache(full)["train"][scored])
    assert torch.equal(cache(run)["eval"], cache(full)["eval"])
    longer = tmp_path / "longer"
    dpo.train_dpo(DPOConfig(**common, out=longer, max_steps=3))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rewardloop.train.dpo"):
        dpo.train_dpo(DPOConfig(**common, out=run, max_steps=3, resume=True))
    assert "read cached reference log-probs" not in caplog.text
    assert f"of {n_train} train pairs the run's 3 steps draw" in caplog.text
    assert losses(run) == losses(longer)
    fly = tmp_path / "fly"
    dpo.train_dpo(DPOConfig(**common, out=fly, max_steps=3, precompute_ref=False))
    # Within float noise: scoring on the fly batches (and pads) the pairs otherwise.
    assert losses(run) == pytest.approx(losses(fly), abs=1e-5)
