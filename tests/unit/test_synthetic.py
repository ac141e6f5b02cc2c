"""The synthetic support task: the hidden gold judge scores aspects as documented."""

from __future__ import annotations

import random
import statistics

import pytest

from rewardloop import synthetic as S

PROMPT = "Hello, my package has not arrived yet. Can you help me?"


def test_topic_detection() -> None:
    assert S.topic_of(PROMPT).name == "delivery"
    assert S.topic_of("I was charged twice this month").name == "billing"
    assert S.topic_of("nothing relevant here") is None


def test_gold_components_hand_checked() -> None:
    good = ("Hello, thank you for reaching out. I am sorry your package is late. "
            "I have checked the delivery and your package will arrive tomorrow.")
    c = S.gold_components(PROMPT, good)
    # topic named (+2) with a concrete action (+1); "thank" and "sorry" (+0.5 each)
    assert c == {"helpful": 3.0, "polite": 1.0, "concise": 0.0, "repetition": 0.0}
    wrong = "I have cancelled your subscription and you will not be charged again."
    assert S.gold_components(PROMPT, wrong)["helpful"] == -1.5
    rude = "This is not our problem. Stop sending us emails."
    c = S.gold_components(PROMPT, rude)
    assert c["polite"] == -4.0 and c["helpful"] == -0.5


def test_repeating_polite_words_does_not_pay() -> None:
    base = "Thank you. I have checked the delivery and your package will arrive tomorrow."
    hacked = base + " thank you" * 30
    assert S.gold_score([PROMPT], [hacked])[0] < S.gold_score([PROMPT], [base])[0]


def test_padding_costs() -> None:
    base = "I have checked the delivery and your package will arrive tomorrow."
    padded = base + " " + " ".join(f"word{i}" for i in range(60)).replace("word", "w")
    assert S.gold_components(PROMPT, padded)["concise"] < 0


def test_quality_knob_orders_mean_gold() -> None:
    rng = random.Random(0)
    means = []
    for q in (0.0, 0.5, 1.0):
        scores = []
        for _ in range(300):
            p = S.support_prompt(rng)
            scores.append(S.gold_score([p], [S.support_reply(rng, p, q)])[0])
        means.append(statistics.mean(scores))
    assert means[0] < means[1] < means[2]


def test_preference_rows_follow_gold_and_are_deterministic() -> None:
    rows = S.preference_rows(50, seed=3)
    assert rows == S.preference_rows(50, seed=3)
    for r in rows:
        gc, gr = S.gold_score([r["prompt"]] * 2, [r["chosen"], r["rejected"]])
        assert gc > gr and r["margin"] == pytest.approx(gc - gr, abs=1e-4)


def test_gold_accepts_chat_lists_and_checks_lengths() -> None:
    chat = [{"role": "assistant", "content": "I have checked the delivery."}]
    plain = ["I have checked the delivery."]
    assert S.gold_score([PROMPT], [chat]) == S.gold_score([PROMPT], plain)
    with pytest.raises(ValueError):
        S.gold_score([PROMPT], [])
