"""Claims checked against computed values: the verdict rules and the table / Markdown rendering.

A claim holds the article's figure (the only place its numbers appear); a check computes our value
from the planner's formulas. Verdicts, from the ratio r = ours / claimed:
- reproduced: within 10% (|r - 1| <= 0.1), inside a claimed range, or a claimed bound that holds;
- approximate: within a factor of 1.5, or within 10% outside a claimed range;
- not reproducible: further off, a bound that fails, or a figure no input of ours determines;
- internally inconsistent: a computed check shows two of the article's own figures cannot both hold
  (or a unit slip), whatever our value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

REPRODUCED, APPROXIMATE, NOT_REPRODUCIBLE, INCONSISTENT = (
    "reproduced", "approximate", "not reproducible", "internally inconsistent")
VERDICTS = (REPRODUCED, APPROXIMATE, NOT_REPRODUCIBLE, INCONSISTENT)
CLOSE, NEAR = 1.1, 1.5  # ratio bands for reproduced / approximate


@dataclass(frozen=True)
class Claimed:
    """The article's figure: a point ``value``, a [low, high] range, or a bound (``bound``: <, <=, >, >=)."""

    text: str  # as the article puts it
    value: float | None = None  # None: a qualitative claim, judged by Finding.holds
    low: float | None = None
    high: float | None = None
    bound: str | None = None


@dataclass(frozen=True)
class Finding:
    """Our side: a computed value (or a computed yes/no for a qualitative claim) and why."""

    shown: str  # our value, formatted
    assumptions: str
    value: float | None = None
    holds: bool | None = None  # qualitative claims
    inconsistency: str | None = None  # set by a computed check on the article's own figures
    note: str = ""  # the reason behind a verdict other than "reproduced", or context


@dataclass(frozen=True)
class Check:
    id: str
    topic: str
    claim: str
    claimed: Claimed
    compute: Callable[[Claimed], Finding]  # given the claim, for checks that test the article's own figures


@dataclass(frozen=True)
class Row:
    id: str
    topic: str
    claim: str
    claimed: str
    ours: str
    rel_diff: float | None
    verdict: str
    assumptions: str
    reason: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def verdict(c: Claimed, f: Finding) -> tuple[str, float | None]:
    """(verdict, relative difference ours/claimed - 1) for one claim."""
    rel = None if c.value is None or f.value is None else f.value / c.value - 1
    if f.inconsistency is not None:
        return INCONSISTENT, rel
    if c.value is None or f.value is None:
        return (REPRODUCED if f.holds else NOT_REPRODUCIBLE), rel
    v = f.value
    if c.bound is not None:
        ok = {"<": v < c.value, "<=": v <= c.value, ">": v > c.value, ">=": v >= c.value}[c.bound]
        return (REPRODUCED if ok else NOT_REPRODUCIBLE), rel
    if c.low is not None and c.high is not None:
        if c.low <= v <= c.high:
            return REPRODUCED, rel
        edge = c.low if v < c.low else c.high
        return (APPROXIMATE if max(v / edge, edge / v) <= CLOSE else NOT_REPRODUCIBLE), rel
    r = max(v / c.value, c.value / v) if v > 0 and c.value > 0 else float("inf")
    return (REPRODUCED if r <= CLOSE else APPROXIMATE if r <= NEAR else NOT_REPRODUCIBLE), rel


def evaluate(checks: list[Check]) -> list[Row]:
    rows = []
    for ch in checks:
        f = ch.compute(ch.claimed)
        v, rel = verdict(ch.claimed, f)
        reason = f.inconsistency if f.inconsistency is not None else f.note
        rows.append(Row(id=ch.id, topic=ch.topic, claim=ch.claim, claimed=ch.claimed.text, ours=f.shown,
                        rel_diff=rel, verdict=v, assumptions=f.assumptions, reason=reason))
    return rows


def _rel(r: Row) -> str:
    return "-" if r.rel_diff is None else f"{r.rel_diff:+.1%}"


def render_rows(rows: list[Row]) -> str:
    """The terminal table: one header line per claim, then its assumptions and reason, indented."""
    out, topic = [], None
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    out.append("The article's figures, recomputed: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    for r in rows:
        if r.topic != topic:
            topic = r.topic
            out.append(f"\n== {topic} ==")
        out.append(f"{r.id:<4} {r.claim}")
        out.append(f"     claimed {r.claimed} | ours {r.ours} | diff {_rel(r)} | {r.verdict.upper()}")
        out.append(f"     assumptions: {r.assumptions}")
        if r.reason:
            out.append(f"     reason: {r.reason}")
    return "\n".join(out)


def render_markdown(rows: list[Row], title: str, preamble: str) -> str:
    """docs/article.md: one table per topic."""
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    out, topic = [f"# {title}", "", preamble, ""], None
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    out.append("Verdicts: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".")
    for r in rows:
        if r.topic != topic:
            topic = r.topic
            out += ["", f"## {topic}", "", "| # | claim | article | ours | diff | verdict | assumptions; reason |",
                    "|---|---|---|---|---|---|---|"]
        why = cell(r.assumptions) + ("" if not r.reason else f"; **{cell(r.reason)}**")
        out.append(f"| {r.id} | {cell(r.claim)} | {cell(r.claimed)} | {cell(r.ours)} | {_rel(r)} | "
                   f"{r.verdict} | {why} |")
    return "\n".join(out) + "\n"
