"""A synthetic preference task with a hidden gold judge: replies to customer-support messages.

Real human labels cost money and time, so research on RLHF methods (and our tests, benchmarks
and demo) needs a task where the *true* preference is known. Here a customer writes about one of
a few problems (a refund, a late delivery, a locked account, ...) and a reply is better when it:

- addresses the customer's actual problem (mentions its topic, offers a concrete action),
- is polite (thanks, apologises, offers more help) and never rude,
- is not padded: past a sensible length, more words cost a little,
- does not game the judge by repeating the same phrase.

``gold_components`` scores those aspects separately so simulated annotator groups can weigh them
differently (a "warm" group that cares more about politeness, a "concise" group that punishes
length more); ``gold_score`` is the hidden gold judge with TRL's reward-function signature.
The corpus generators give mixed-quality replies so a supervised model learns the domain without
learning only good answers, leaving room for RLHF to improve it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Topic:
    name: str
    keywords: tuple[str, ...]
    problems: tuple[str, ...]
    empathy: str
    actions: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic("refund", ("refund", "money back"),
          ("I want a refund for my order", "I returned the shoes but I still have no refund",
           "please give my money back for the broken lamp"),
          "I am sorry the refund is taking so long.",
          ("I have started a refund for your order and it will arrive in three days.",
           "Your refund is approved and the money will be back on your card this week.")),
    Topic("delivery", ("delivery", "package", "parcel"),
          ("my package has not arrived yet", "the delivery is two weeks late",
           "the parcel tracking has not changed for days"),
          "I am sorry your package is late.",
          ("I have checked the delivery and your package will arrive tomorrow.",
           "I sent a new parcel today with express delivery at no cost.")),
    Topic("password", ("password", "reset link"),
          ("I forgot my password and cannot log in", "the password reset link does not work",
           "I never get the reset link for my password"),
          "I am sorry you cannot get into your account.",
          ("I have sent a new reset link so you can choose a new password.",
           "Please use the reset link I just sent to set a new password.")),
    Topic("billing", ("charge", "invoice", "billing"),
          ("I was charged twice this month", "there is a wrong charge on my invoice",
           "my billing shows a charge I do not know"),
          "I am sorry about the wrong charge.",
          ("I have removed the extra charge and sent you a new invoice.",
           "The double charge is cancelled and you will see it on your next invoice.")),
    Topic("cancel", ("cancel", "subscription"),
          ("I want to cancel my subscription", "how do I cancel my plan before it renews",
           "please cancel my subscription today"),
          "I am sorry to see you go.",
          ("I have cancelled your subscription and you will not be charged again.",
           "Your subscription is cancelled from today and no more payments will be taken.")),
    Topic("broken", ("broken", "replacement", "damaged"),
          ("the blender I bought arrived broken", "my new phone case is damaged",
           "the chair was broken when it came"),
          "I am sorry your item arrived damaged.",
          ("I have sent a free replacement and you can keep the broken one.",
           "A replacement is on its way and a return label is in your email.")),
)

GREETINGS_POLITE = ("Hello, thank you for reaching out.", "Hi there, thanks for contacting us.",
                    "Good morning and thank you for your message.")
GREETINGS_PLAIN = ("Hello.", "Hi.", "")
RUDE = ("Read the help page first.", "This is not our problem.", "Stop sending us emails.",
        "We cannot do anything, deal with it.")
CLOSINGS_POLITE = ("Is there anything else I can help with?", "Have a nice day.",
                   "Please let me know if you need anything else.")
VAGUE = ("We will look into it at some point.", "Our team is aware of many issues.",
         "Things like this can happen sometimes.")
FILLER = ("Our company was founded many years ago and we value every customer.",
          "We have many products and services for all kinds of people.",
          "Our office is open on weekdays and some weekends.",
          "We always try to improve our service for everyone.")
OPENERS = ("Hi,", "Hello,", "Good morning,", "Dear support,", "")
MOODS = ("", "This is very frustrating.", "Can you help me?", "I am really upset.", "Thanks.")

POLITE_MARKERS = ("thank", "sorry", "please", "happy to help", "have a nice day",
                  "anything else")
RUDE_MARKERS = ("not our problem", "deal with it", "stop sending", "read the help page")
WORD_RE = re.compile(r"[a-z']+")
ACTION_RE = re.compile(r"\b(i have|i (just )?sent|will|is on its way|is cancelled|is approved)\b")


def topic_of(prompt: str) -> Topic | None:
    """The topic a customer message is about (the first topic whose problem text it contains,
    else the first whose keyword it mentions)."""
    low = prompt.lower()
    for topic in TOPICS:
        if any(p.lower() in low for p in topic.problems):
            return topic
    for topic in TOPICS:
        if any(k in low for k in topic.keywords):
            return topic
    return None


def support_prompt(rng: random.Random, topic: Topic | None = None) -> str:
    """One customer message: an opener, a problem of ``topic`` (random if None), a mood."""
    topic = topic or rng.choice(TOPICS)
    parts = [rng.choice(OPENERS), rng.choice(topic.problems) + ".", rng.choice(MOODS)]
    return " ".join(p for p in parts if p)


def support_reply(rng: random.Random, prompt: str, quality: float) -> str:
    """A reply whose expected gold score grows with ``quality`` in [0, 1].

    Each part (greeting, empathy, the right action, a polite closing) is included with a
    probability tied to ``quality``; low quality adds rudeness, vague or wrong-topic answers and
    filler that makes replies long without helping (a length-bias trap for reward models).
    """
    topic = topic_of(prompt) or rng.choice(TOPICS)
    q = min(max(quality, 0.0), 1.0)
    parts: list[str] = []
    if rng.random() < q:
        parts.append(rng.choice(GREETINGS_POLITE))
    else:
        parts.append(rng.choice(GREETINGS_PLAIN))
    if rng.random() < q:
        parts.append(topic.empathy)
    if rng.random() < 0.25 * (1 - q):
        parts.append(rng.choice(RUDE))
    roll = rng.random()
    if roll < 0.2 + 0.75 * q:
        parts.append(rng.choice(topic.actions))
    elif roll < 0.6 + 0.3 * q:
        parts.append(rng.choice(VAGUE))
    else:
        other = rng.choice([t for t in TOPICS if t is not topic])
        parts.append(rng.choice(other.actions))
    for _ in range(rng.choice((0, 0, 1, 2)) if rng.random() > q else 0):
        parts.append(rng.choice(FILLER))
    if rng.random() < q:
        parts.append(rng.choice(CLOSINGS_POLITE))
    return " ".join(p for p in parts if p)


def gold_components(prompt: str, completion: str) -> dict[str, float]:
    """The hidden judge's view of one reply, by aspect (higher is better).

    - ``helpful``: +2 when the reply names the customer's topic, +1 more for a concrete action
      ("I have ...", "will ..."), -1.5 when it talks about a different topic instead, -0.5 when
      it says nothing on any topic.
    - ``polite``: +0.5 per distinct polite marker (at most 4 count, so repeating "thank you"
      earns nothing), -2 per rude marker.
    - ``concise``: -0.04 per word beyond 45 words.
    - ``repetition``: -3 x the share of repeated words beyond the first use of each word,
      past a natural 35% baseline: degenerate repeated text is always bad.
    """
    low = completion.lower()
    words = WORD_RE.findall(low)
    topic = topic_of(prompt)
    mentions = {t.name for t in TOPICS if any(k in low for k in t.keywords)}
    helpful = 0.0
    if topic is not None and topic.name in mentions:
        helpful += 2.0
        if ACTION_RE.search(low):
            helpful += 1.0
    elif mentions:
        helpful -= 1.5
    else:
        helpful -= 0.5
    polite = 0.5 * min(4, sum(1 for m in POLITE_MARKERS if m in low))
    polite -= 2.0 * sum(1 for m in RUDE_MARKERS if m in low)
    concise = -0.04 * max(0, len(words) - 45)
    repeated = 1.0 - len(set(words)) / len(words) if words else 1.0
    repetition = -3.0 * max(0.0, repeated - 0.35)
    return {"helpful": helpful, "polite": polite, "concise": concise, "repetition": repetition}


GOLD_WEIGHTS = {"helpful": 1.0, "polite": 0.6, "concise": 1.0, "repetition": 1.0}


def gold_score(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """The hidden gold judge, with TRL's reward-function signature.

    Prompts/completions may be strings or chat lists (the last message's content is used).
    """
    def text(x: Any) -> str:
        if isinstance(x, list):
            return str(x[-1]["content"]) if x else ""
        return str(x)

    scores = []
    for p, c in zip(prompts, completions, strict=True):
        comps = gold_components(text(p), text(c))
        scores.append(sum(GOLD_WEIGHTS[k] * v for k, v in comps.items()))
    return scores


def gold_components_batch(prompts: list[Any], completions: list[Any], **_: Any) -> list[dict]:
    """``gold_components`` for a batch: per-aspect scores that annotator groups can weigh."""
    return [gold_components(str(p), str(c)) for p, c in zip(prompts, completions, strict=True)]


def sft_rows(n: int, seed: int = 0, quality: tuple[float, float] = (0.3, 0.9)) -> list[dict]:
    """``n`` prompt/completion rows of mixed quality (uniform in ``quality``)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = support_prompt(rng)
        rows.append({"prompt": prompt,
                     "completion": support_reply(rng, prompt, rng.uniform(*quality))})
    return rows


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` prompts rows (``{"prompt": ...}``), each topic equally likely."""
    rng = random.Random(seed)
    return [{"prompt": support_prompt(rng)} for _ in range(n)]


def candidate_rows(n: int, k: int = 2, seed: int = 0) -> list[dict]:
    """``n`` candidates rows: a prompt and ``k`` replies of independently drawn quality."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = support_prompt(rng)
        rows.append({"prompt": prompt,
                     "responses": [support_reply(rng, prompt, rng.random()) for _ in range(k)]})
    return rows


def preference_rows(n: int, seed: int = 0, *, min_gap: float = 0.0) -> list[dict]:
    """``n`` TRL pairwise rows labelled by the gold judge (ties and gaps < ``min_gap`` redrawn).

    ``margin`` is the gold score difference, so margin-aware losses can use it.
    """
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < n:
        prompt = support_prompt(rng)
        a = support_reply(rng, prompt, rng.random())
        b = support_reply(rng, prompt, rng.random())
        ga, gb = gold_score([prompt, prompt], [a, b])
        if a == b or abs(ga - gb) <= min_gap:
            continue
        chosen, rejected = (a, b) if ga > gb else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "margin": round(abs(ga - gb), 4)})
    return rows


def corpus_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts covering the domain's vocabulary (prompts and replies of every quality), for
    training a tiny tokenizer."""
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(n):
        prompt = support_prompt(rng)
        texts.append(prompt)
        texts.append(support_reply(rng, prompt, rng.random()))
    return texts


def style_components(prompts: list[Any], completions: list[Any], **_: Any) -> list[dict]:
    """Two surface aspects of each reply that a small reward model can read: ``polite`` (as in
    ``gold_components``) and ``brief`` (-0.1 per word). Groups that weigh ``polite`` with
    opposite signs but agree on ``brief`` disagree on exactly one aspect: the pool of the
    group-balance experiments (``benchmarks/groups.py``)."""
    out = []
    for p, c in zip(prompts, completions, strict=True):
        comps = gold_components(str(p), str(c))
        out.append({"polite": comps["polite"],
                    "brief": -0.1 * len(WORD_RE.findall(str(c).lower()))})
    return out
