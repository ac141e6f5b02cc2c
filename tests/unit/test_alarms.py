"""Over-optimisation alarms on hand-made histories (every expected value worked out by hand)."""

from __future__ import annotations

import pytest

from rewardloop.eval.alarms import (
    AlarmSettings,
    best_index,
    check_alarms,
    divergence_alarm,
    kl_alarm,
    length_alarm,
)


def _rows(proxy: list[float], gold: list[float]) -> list[dict[str, float]]:
    pairs = zip(proxy, gold, strict=True)
    return [{"step": i + 1, "proxy": p, "gold": g} for i, (p, g) in enumerate(pairs)]


def test_divergence_fires_when_proxy_rises_and_gold_falls() -> None:
    # window 2: steps 1-2 vs 3-4: proxy 0.15 -> 0.35 (up), gold 1.0 -> 0.75 (down) at step 4.
    rows = _rows([0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 0.8, 0.7])
    message = divergence_alarm(rows, "proxy", "gold", window=2)
    assert message is not None
    assert message.startswith("step 4:")
    assert "0.15 -> 0.35" in message and "1 -> 0.75" in message
    assert "--reward-uncertainty-penalty" in message and "--ensemble 4" in message  # the defence


def test_divergence_quiet_when_both_rise_or_too_short() -> None:
    assert divergence_alarm(_rows([0.1, 0.2, 0.3, 0.4], [1, 1.1, 1.2, 1.3]), "proxy", "gold",
                            window=2) is None
    # three records cannot fill two windows of 2
    assert divergence_alarm(_rows([0.1, 0.2, 0.9], [1, 1, 0]), "proxy", "gold", window=2) is None


def test_divergence_first_point_and_min_change() -> None:
    # window 1: step 2 vs 1: proxy +0.1, gold -0.05 -> fires at step 2 without a threshold ...
    rows = _rows([0.0, 0.1, 0.5], [1.0, 0.95, 0.5])
    assert divergence_alarm(rows, "proxy", "gold", window=1).startswith("step 2:")
    # ... with min_change 0.2 the first step is noise; step 3 (+0.4, -0.45) fires.
    assert divergence_alarm(rows, "proxy", "gold", window=1, min_change=0.2).startswith("step 3:")


def test_divergence_skips_records_without_both_keys() -> None:
    rows = [{"step": 1, "proxy": 0.0, "gold": 1.0}, {"step": 2, "proxy": 5.0},
            {"step": 3, "proxy": 1.0, "gold": 0.0}]
    # the pair compared is step 1 vs step 3; the message names step 3
    assert divergence_alarm(rows, "proxy", "gold", window=1).startswith("step 3:")


def test_kl_alarm_first_record_beyond_max() -> None:
    rows = [{"step": 10, "kl": 1.0}, {"step": 20, "kl": 6.0}, {"step": 30, "kl": 9.0}]
    assert kl_alarm(rows, "kl", 5.0).startswith("step 20:")
    assert kl_alarm(rows, "kl", 9.0) is None  # equal is not beyond


def test_length_alarm_ratio_to_start() -> None:
    rows = [{"round": 1, "length": 10.0}, {"round": 2, "length": 19.0},
            {"round": 3, "length": 21.0}]
    message = length_alarm(rows, "length", 2.0, step_key="round")
    assert message is not None and message.startswith("round 3:") and "2.10x" in message
    assert length_alarm(rows, "length", 2.5, step_key="round") is None


def test_check_alarms_collects_in_order() -> None:
    rows = [{"step": 1, "proxy": 0.0, "gold": 1.0, "kl": 0.0, "length": 10},
            {"step": 2, "proxy": 1.0, "gold": 0.0, "kl": 3.0, "length": 30}]
    settings = AlarmSettings(window=1, max_kl=2.0, max_length_ratio=2.0)
    found = check_alarms(rows, settings)
    assert len(found) == 3
    assert "held-out gold" in found[0] and "KL" in found[1] and "length" in found[2]
    assert check_alarms(rows, AlarmSettings(window=1, held_out_keys=())) == []


def test_best_index_prefers_first_available_key_and_earliest_tie() -> None:
    rows = [{"gold": 0.5, "proxy": 9}, {"gold": 0.7}, {"gold": 0.7}, {"proxy": 10}]
    assert best_index(rows, ("gold", "proxy")) == 1
    assert best_index(rows, ("human", "proxy")) == 3
    assert best_index(rows, ("human",)) is None


@pytest.mark.parametrize("bad", [{"window": 0}, {"max_kl": 0.0}, {"max_length_ratio": 1.0},
                                 {"min_change": -1.0}])
def test_settings_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        AlarmSettings(**bad)


def test_noise_alone_does_not_raise_a_divergence_alarm() -> None:
    import random

    rng = random.Random(0)
    # flat proxy and gold with step noise: windows of 3 wobble, but never beyond 2 std errors
    # of the change in both directions at once often enough to matter over this run
    rows = [{"step": i, "proxy": rng.gauss(0, 1), "gold": rng.gauss(0, 1)} for i in range(60)]
    assert divergence_alarm(rows, "proxy", "gold", window=10) is None
    # a real divergence (proxy +2, gold -2 from step 30) is still caught
    rows = [{"step": i, "proxy": rng.gauss(2 * (i >= 30), 0.5),
             "gold": rng.gauss(-2 * (i >= 30), 0.5)} for i in range(60)]
    assert divergence_alarm(rows, "proxy", "gold", window=10) is not None


def test_change_noise_hand_worked() -> None:
    from rewardloop.eval.alarms import _change_noise

    # var([0, 2]) = 2 and var([1, 3]) = 2 -> sqrt(2/2 + 2/2) = sqrt(2)
    assert abs(_change_noise([0, 2], [1, 3]) - 2 ** 0.5) < 1e-12
    assert _change_noise([1], [2]) == 0.0


def test_single_rounds_are_judged_against_their_stated_intervals() -> None:
    """The loop compares rounds one to one: their win-rate intervals are the noise."""
    def rounds(proxy: list[float], gold: list[float], half: float) -> list[dict]:
        pairs = enumerate(zip(proxy, gold, strict=True))
        return [{"round": i + 1, "proxy": p, "gold": g, "proxy_ci": [p - half, p + half],
                 "gold_ci": [g - half, g + half]} for i, (p, g) in pairs]

    # one prompt in 64 either way, intervals +-0.12: noise, no alarm
    wiggle = rounds([0.70, 0.7156], [0.62, 0.6044], 0.12)
    assert divergence_alarm(wiggle, "proxy", "gold", window=1, step_key="round",
                            ci_suffix="_ci") is None
    # without the intervals that wiggle fires, and the message says there was no noise estimate
    message = divergence_alarm(wiggle, "proxy", "gold", window=1, step_key="round")
    assert message is not None and "no noise estimate for either side" in message
    # a real divergence, each change beyond 2 standard errors (0.12 / 1.96 each side)
    big = rounds([0.55, 0.85], [0.70, 0.40], 0.12)
    message = divergence_alarm(big, "proxy", "gold", window=1, step_key="round", ci_suffix="_ci")
    assert message is not None and message.startswith("round 2:")
    assert "beyond 2 standard errors" in message
    # the held-out side's own noise counts too: the proxy rose clearly, gold fell within noise
    mixed = rounds([0.55, 0.85], [0.70, 0.62], 0.12)
    assert divergence_alarm(mixed, "proxy", "gold", window=1, step_key="round",
                            ci_suffix="_ci") is None


def test_a_held_out_fall_inside_its_window_noise_is_not_a_divergence() -> None:
    # proxy rises steadily (little spread); gold's windows overlap widely: its fall is noise
    rows = _rows([0.10, 0.11, 0.12, 0.50, 0.51, 0.52], [0.9, 0.3, 0.6, 0.8, 0.2, 0.5])
    assert divergence_alarm(rows, "proxy", "gold", window=3) is None
    # the same fall with a steady gold is one
    steady = _rows([0.10, 0.11, 0.12, 0.50, 0.51, 0.52], [0.61, 0.60, 0.60, 0.50, 0.51, 0.50])
    assert divergence_alarm(steady, "proxy", "gold", window=3) is not None
