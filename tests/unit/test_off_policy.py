"""Off-policy correction for samples from another engine: truncated importance-sampling weights,
the mismatch metrics, and the weights entering the PPO loss — against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rewardloop.pg_losses import ppo_clip_loss, sampler_mismatch, truncated_is_weights


def _logs(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows).log()


# Row 0: ratios trainer/sampler 0.5/0.25 = 2, 0.2/0.4 = 0.5, then a padded position (ratio 3).
# Row 1: ratios 0.8/0.2 = 4, 0.6/0.3 = 2, padding.
TRAINER = _logs([0.5, 0.2, 0.9], [0.8, 0.6, 0.5])
SAMPLER = _logs([0.25, 0.4, 0.3], [0.2, 0.3, 0.5])
MASK = torch.tensor([[1, 1, 0], [1, 1, 0]])


def test_token_level_truncates_each_ratio_at_the_cap() -> None:
    w = truncated_is_weights(TRAINER, SAMPLER, MASK, cap=1.5, level="token")
    assert torch.allclose(w, torch.tensor([[1.5, 0.5, 0.0], [1.5, 1.5, 0.0]]))
    w = truncated_is_weights(TRAINER, SAMPLER, MASK, cap=10.0, level="token")
    assert torch.allclose(w, torch.tensor([[2.0, 0.5, 0.0], [4.0, 2.0, 0.0]]))


def test_sequence_level_masks_whole_sequences_whose_ratio_exceeds_the_cap() -> None:
    # Sequence ratios: row 0: 2 * 0.5 = 1 (padding ignored); row 1: 4 * 2 = 8.
    w = truncated_is_weights(TRAINER, SAMPLER, MASK, cap=1.5, level="sequence")
    assert torch.equal(w, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    w = truncated_is_weights(TRAINER, SAMPLER, MASK, cap=8.5, level="sequence")
    assert torch.equal(w, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))


def test_off_is_ones_on_real_tokens_and_bad_arguments_are_refused() -> None:
    w = truncated_is_weights(TRAINER, SAMPLER, MASK, cap=2.0, level="off")
    assert torch.equal(w, MASK.float())
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(TRAINER, SAMPLER, MASK, cap=0.0)
    with pytest.raises(ValueError, match="level"):
        truncated_is_weights(TRAINER, SAMPLER, MASK, cap=2.0, level="tokens")


def test_weights_carry_no_gradient() -> None:
    trainer = TRAINER.clone().requires_grad_(True)
    assert not truncated_is_weights(trainer, SAMPLER, MASK, cap=2.0).requires_grad


def test_mismatch_metrics_by_hand() -> None:
    m = sampler_mismatch(TRAINER[:1], SAMPLER[:1], MASK[:1])
    # log ratios ln 2 and -ln 2: k1 = mean(-log r) = 0; k3 = mean(r - 1 - log r)
    # = ((2 - 1 - ln 2) + (0.5 - 1 + ln 2)) / 2 = 0.25; ratios 2 and 0.5.
    assert m["sampler_kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["sampler_kl_k3"] == pytest.approx(0.25, abs=1e-6)
    assert m["is_ratio_mean"] == pytest.approx(1.25, abs=1e-6)
    assert m["is_ratio_max"] == pytest.approx(2.0, abs=1e-6)
    m = sampler_mismatch(TRAINER, SAMPLER, MASK)
    k1 = -(math.log(2) - math.log(2) + math.log(4) + math.log(2)) / 4
    assert m["sampler_kl"] == pytest.approx(k1, abs=1e-6)
    assert m["is_ratio_max"] == pytest.approx(4.0, abs=1e-5)  # padding's 3 does not count


def test_identical_engines_show_no_mismatch() -> None:
    m = sampler_mismatch(TRAINER, TRAINER, MASK)
    assert m == pytest.approx({"sampler_kl": 0.0, "sampler_kl_k3": 0.0, "is_ratio_mean": 1.0,
                               "is_ratio_max": 1.0})


def test_is_weights_scale_each_tokens_ppo_loss() -> None:
    logp = torch.zeros(1, 2)  # ratio 1: loss_t = -A_t
    adv = torch.tensor([[1.0, 2.0]])
    mask = torch.ones(1, 2)
    plain, _ = ppo_clip_loss(logp, logp, adv, mask)
    assert float(plain) == pytest.approx(-1.5)
    weighted, _ = ppo_clip_loss(logp, logp, adv, mask, is_weights=torch.tensor([[0.5, 1.0]]))
    assert float(weighted) == pytest.approx(-(0.5 * 1 + 1.0 * 2) / 2)


def test_padding_that_holds_minus_infinity_gives_finite_weights_and_metrics() -> None:
    """Padding is left out, not multiplied by 0: an engine marking it -inf (or NaN) made the
    token weights NaN and silently dropped the whole sequence under the sequence mask."""
    sampler = SAMPLER.clone()
    sampler[:, 2] = -math.inf
    trainer = TRAINER.clone()
    trainer[1, 2] = math.nan
    for level in ("token", "sequence"):
        assert torch.equal(truncated_is_weights(trainer, sampler, MASK, cap=8.5, level=level),
                           truncated_is_weights(TRAINER, SAMPLER, MASK, cap=8.5, level=level))
    assert sampler_mismatch(trainer, sampler, MASK) == sampler_mismatch(TRAINER, SAMPLER, MASK)
