"""Over-optimisation alarms: pure functions over a history of records (steps or rounds).

A policy that games its reward model shows it in a few figures long before anyone reads its
answers (Gao et al. 2022, "Scaling laws for reward model overoptimization"):

- the proxy reward keeps rising while a held-out judge (a gold function, or people's win rate)
  falls -- compared over a window, so one noisy step does not raise it;
- the policy drifts far from its reference (KL per sequence beyond ``max_kl``);
- answers grow (mean length beyond ``max_length_ratio`` times the first record's), the most
  common way to please a length-biased reward model.

Each record is a mapping such as one ``metrics.jsonl`` row or one loop round; a key a record
lacks is simply not checked there. ``check_alarms`` returns human-readable messages; callers log
them as warnings and write them to ``summary.json`` under ``alarms`` (the report shows them).
``best_index`` picks the record to keep as the best checkpoint by the held-out score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Record = Mapping[str, Any]


@dataclass(frozen=True)
class AlarmSettings:
    """Which keys to watch and when to raise an alarm."""

    proxy_key: str = "proxy"
    """Key of the optimised (proxy) reward, e.g. ``reward/mean`` in an RL run's metrics."""
    held_out_keys: tuple[str, ...] = ("gold", "human")
    """Keys of held-out judges (gold function score, human win rate); each is compared with
    the proxy separately."""
    kl_key: str = "kl"
    """Key of the KL to the reference per sequence (e.g. ``kl_seq_k1``)."""
    length_key: str = "length"
    """Key of the mean answer length (tokens or words; only ratios are used)."""
    step_key: str = "step"
    """Key naming the record in messages (``step`` or ``round``); its index when absent."""
    window: int = 3
    """Records averaged on each side of the proxy/held-out comparison (needs 2 x window)."""
    min_change: float = 0.0
    """Changes of at most this size (in either direction) do not count as rising or falling."""
    max_kl: float | None = None
    """Alarm when the KL exceeds this; None = no KL alarm."""
    max_length_ratio: float | None = None
    """Alarm when the mean length exceeds this times the first record's; None = off."""
    ci_suffix: str | None = None
    """Records that carry a 95% interval of a watched figure under ``<key><ci_suffix>``
    (``[low, high]``; e.g. the loop's per-round win rates, ``_ci``): its standard error joins
    the noise a change must exceed, which windows of one record cannot estimate."""

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.min_change < 0:
            raise ValueError("min_change must be >= 0")
        if self.max_kl is not None and self.max_kl <= 0:
            raise ValueError("max_kl must be > 0 (or null to turn the alarm off)")
        if self.max_length_ratio is not None and self.max_length_ratio <= 1:
            raise ValueError("max_length_ratio must be > 1 (or null to turn the alarm off)")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _name(records: Sequence[Record], index: int, step_key: str) -> str:
    step = records[index].get(step_key, index)
    return f"{step_key} {step}"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _change_noise(before: Sequence[float], after: Sequence[float]) -> float:
    """Standard error of the difference of two window means (0 for windows of one record).

    Step-level metrics of an RL run are noisy (a batch of 32 samples); without this, a window
    where the proxy wobbles up while gold wobbles down raises a false alarm in most runs.
    """
    if len(before) < 2 or len(after) < 2:
        return 0.0

    def var(xs: Sequence[float]) -> float:
        m = _mean(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    return math.sqrt(var(before) / len(before) + var(after) / len(after))


OVEROPTIMISATION_DEFENCE = (
    "Try: a 4-head reward-model ensemble (train rm --ensemble 4) optimised with "
    "--reward-uncertainty-penalty 1.0 (Coste et al. 2023), a larger --kl-coef, or the "
    "checkpoint before this point")
"""What the gold-versus-proxy alarm tells the user to do (docs/reward-models.md)."""


Z_95 = 1.959963984540054


def _stated_error(record: Record, key: str, ci_suffix: str | None) -> float | None:
    """The standard error a record states for ``key`` through its 95% interval, if any."""
    if ci_suffix is None:
        return None
    ci = record.get(f"{key}{ci_suffix}")
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return None
    low, high = _number(ci[0]), _number(ci[1])
    return None if low is None or high is None else (high - low) / (2 * Z_95)


def _stated_noise(before: Sequence[float | None], after: Sequence[float | None]) -> float:
    """Standard error of the difference of two window means from the records' own stated
    errors (0 unless every record states one)."""
    if any(e is None for e in (*before, *after)):
        return 0.0
    return math.sqrt(sum(e * e for e in before if e is not None) / len(before) ** 2
                     + sum(e * e for e in after if e is not None) / len(after) ** 2)


def divergence_alarm(records: Sequence[Record], proxy_key: str, held_out_key: str, *,
                     window: int = 3, min_change: float = 0.0, step_key: str = "step",
                     z: float = 2.0, ci_suffix: str | None = None) -> str | None:
    """The first point where the proxy's mean over the last ``window`` records (that have both
    keys) rose over the ``window`` before, while the held-out mean fell; None when that never
    happens. Each change must exceed ``min_change`` and ``z`` standard errors of the change
    (from the spread inside the windows, or from the records' own 95% intervals under
    ``<key><ci_suffix>``, whichever is larger), so noise alone rarely raises it. Windows of one
    record without stated intervals have no noise estimate: any change counts, and the
    message says so."""
    paired = [(i, p, h) for i, r in enumerate(records)
              if (p := _number(r.get(proxy_key))) is not None
              and (h := _number(r.get(held_out_key))) is not None]
    errors = {i: (_stated_error(records[i], proxy_key, ci_suffix),
                  _stated_error(records[i], held_out_key, ci_suffix)) for i, _, _ in paired}
    for end in range(2 * window, len(paired) + 1):
        before, after = paired[end - 2 * window:end - window], paired[end - window:end]
        p0, p1 = [p for _, p, _ in before], [p for _, p, _ in after]
        h0, h1 = [h for _, _, h in before], [h for _, _, h in after]
        proxy_0, proxy_1, held_0, held_1 = _mean(p0), _mean(p1), _mean(h0), _mean(h1)
        proxy_noise = max(_change_noise(p0, p1), _stated_noise(
            [errors[i][0] for i, _, _ in before], [errors[i][0] for i, _, _ in after]))
        held_noise = max(_change_noise(h0, h1), _stated_noise(
            [errors[i][1] for i, _, _ in before], [errors[i][1] for i, _, _ in after]))
        proxy_bar = max(min_change, z * proxy_noise)
        held_bar = max(min_change, z * held_noise)
        if proxy_1 - proxy_0 > proxy_bar and held_0 - held_1 > held_bar:
            where = _name(records, after[-1][0], step_key)
            beyond = (f"beyond {z:g} standard errors" if proxy_noise > 0 and held_noise > 0
                      else "single records, no noise estimate for "
                      + ("either side" if proxy_noise == held_noise == 0 else
                         "the proxy" if proxy_noise == 0 else "the held-out side"))
            return (f"{where}: proxy reward {proxy_key} rose {proxy_0:.4g} -> {proxy_1:.4g} "
                    f"while held-out {held_out_key} fell {held_0:.4g} -> {held_1:.4g} "
                    f"(means over windows of {window}, {beyond}): the "
                    f"policy may be gaming the reward model. {OVEROPTIMISATION_DEFENCE}")
    return None


def kl_alarm(records: Sequence[Record], kl_key: str, max_kl: float, *,
             step_key: str = "step") -> str | None:
    """The first record whose KL exceeds ``max_kl``; None if none does."""
    for i, record in enumerate(records):
        kl = _number(record.get(kl_key))
        if kl is not None and kl > max_kl:
            return (f"{_name(records, i, step_key)}: KL to the reference {kl_key} = {kl:.4g} "
                    f"exceeds max_kl {max_kl:.4g}: the policy drifted far from where it started; "
                    "raise the KL coefficient or lower the learning rate")
    return None


def length_alarm(records: Sequence[Record], length_key: str, max_ratio: float, *,
                 step_key: str = "step") -> str | None:
    """The first record whose mean length exceeds ``max_ratio`` x the first record's."""
    start: float | None = None
    for i, record in enumerate(records):
        length = _number(record.get(length_key))
        if length is None:
            continue
        if start is None:
            start = length
            continue
        if start > 0 and length > max_ratio * start:
            return (f"{_name(records, i, step_key)}: mean answer length {length_key} = "
                    f"{length:.4g} is {length / start:.2f}x the start ({start:.4g}), beyond "
                    f"max_length_ratio {max_ratio:g}: check for length hacking")
    return None


def check_alarms(records: Sequence[Record], settings: AlarmSettings | None = None) -> list[str]:
    """Every alarm ``settings`` asks for, in a fixed order (divergence per held-out key, KL,
    length); an empty list when all is well."""
    s = settings or AlarmSettings()
    found = [divergence_alarm(records, s.proxy_key, key, window=s.window,
                              min_change=s.min_change, step_key=s.step_key,
                              ci_suffix=s.ci_suffix)
             for key in s.held_out_keys]
    if s.max_kl is not None:
        found.append(kl_alarm(records, s.kl_key, s.max_kl, step_key=s.step_key))
    if s.max_length_ratio is not None:
        found.append(length_alarm(records, s.length_key, s.max_length_ratio,
                                  step_key=s.step_key))
    return [message for message in found if message is not None]


def best_index(records: Sequence[Record], keys: Sequence[str]) -> int | None:
    """Index of the record with the highest value of the first of ``keys`` that any record has
    (earliest on ties); None when no record has any of them."""
    for key in keys:
        scored = [(v, -i) for i, r in enumerate(records) if (v := _number(r.get(key))) is not None]
        if scored:
            return -max(scored)[1]
    return None


def group_win_rate_alarms(overall: float | None,
                          by_group: Mapping[str, tuple[float, float]]) -> list[str]:
    """Whose win is it? A policy can beat its baseline overall while losing for a group
    whose taste the reward model did not learn: one message per group that loses clearly
    (``by_group``: win rate and the upper end of its 95% interval, which must be below 0.5:
    one lost battle is not a finding) while the overall rate is above 0.5."""
    if overall is None or not overall > 0.5:
        return []
    return [f"the policy wins overall ({overall:.2f}) but loses for group {g!r} "
            f"(win rate {rate:.2f}, 95% interval up to {high:.2f} < 0.5)"
            for g, (rate, high) in sorted(by_group.items()) if high < 0.5]
