"""Score alerts against a generator's ground truth: precision and recall per rule.

An alert and a truth entry match on `rule|institution|subject|event_id`, where the subject is the
code for code rules, the product for the ledger rules and empty for line rules, and the event is
the one that triggered the alert (the last of its `event_ids`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from detectors.alerts import RULES
from loadtest.generator import truth_key

LEDGER_RULES = frozenset({"OVERSOLD", "STOCK_COUNT_MISMATCH"})


def alert_key(alert: dict[str, Any]) -> str:
    rule = alert["rule"]
    subject = alert.get("product") if rule in LEDGER_RULES else alert.get("code")
    return truth_key(rule, alert["institution"], subject, alert["event_ids"][-1])


@dataclass(slots=True)
class Score:
    true_positive: Counter[str] = field(default_factory=Counter)
    false_positive: Counter[str] = field(default_factory=Counter)
    false_negative: Counter[str] = field(default_factory=Counter)
    missed: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def precision(self, rule: str | None = None) -> float:
        tp, fp = self._sum(self.true_positive, rule), self._sum(self.false_positive, rule)
        return tp / (tp + fp) if tp + fp else 1.0

    def recall(self, rule: str | None = None) -> float:
        tp, fn = self._sum(self.true_positive, rule), self._sum(self.false_negative, rule)
        return tp / (tp + fn) if tp + fn else 1.0

    @staticmethod
    def _sum(counter: Counter[str], rule: str | None) -> int:
        return counter[rule] if rule is not None else sum(counter.values())

    def table(self, scans: int) -> str:
        lines = [f"{'rule':<24}{'truth':>7}{'alerts':>8}{'precision':>11}{'recall':>8}"]
        for rule in RULES:
            tp = self.true_positive[rule]
            truth = tp + self.false_negative[rule]
            alerts = tp + self.false_positive[rule]
            if truth or alerts:
                lines.append(
                    f"{rule:<24}{truth:>7}{alerts:>8}{self.precision(rule):>11.3f}{self.recall(rule):>8.3f}"
                )
        false_alerts = sum(self.false_positive.values())
        per_10k = false_alerts / scans * 10_000 if scans else 0.0
        lines.append(
            f"{'all':<24}{sum(self.true_positive.values()) + sum(self.false_negative.values()):>7}"
            f"{sum(self.true_positive.values()) + false_alerts:>8}"
            f"{self.precision():>11.3f}{self.recall():>8.3f}"
        )
        lines.append(
            f"false alerts per 10,000 scans: {per_10k:.2f} ({false_alerts} in {scans} scans)"
        )
        return "\n".join(lines)


def score(alerts: Iterable[dict[str, Any]], truth: Iterable[str]) -> Score:
    expected = set(truth)
    got = {alert_key(a) for a in alerts}
    result = Score()
    for key in got:
        rule = key.split("|", 1)[0]
        if key in expected:
            result.true_positive[rule] += 1
        else:
            result.false_positive[rule] += 1
            result.unexpected.append(key)
    for key in expected - got:
        result.false_negative[key.split("|", 1)[0]] += 1
        result.missed.append(key)
    return result


def count_scans(events: Iterable[bytes]) -> int:
    """Code scans in a stream (retries and malformed lines included: they were scanned too)."""
    import orjson

    total = 0
    for raw in events:
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict):
            for line in event.get("lines") or ():
                if isinstance(line, dict):
                    total += len(line.get("codes") or ())
            total += len(event.get("codes") or ())
    return total
