"""`moegpt plan --article`: every claim gets a computed value and a verdict; docs/article.md is current."""

from pathlib import Path

import pytest

from moegpt.planner.article import article_markdown, article_rows, article_table
from moegpt.planner.claims import (APPROXIMATE, INCONSISTENT, NOT_REPRODUCIBLE, REPRODUCED, VERDICTS, Claimed,
                                   Finding, verdict)

DOC = Path(__file__).resolve().parents[2] / "docs" / "article.md"


@pytest.fixture(scope="module")
def rows():
    return article_rows()


def test_every_claim_has_a_verdict_and_assumptions(rows):
    assert len(rows) >= 40
    assert len({r.id for r in rows}) == len(rows)
    for r in rows:
        assert r.verdict in VERDICTS, r.id
        assert r.assumptions, r.id
        if r.verdict not in (REPRODUCED,) and not r.id.startswith("X"):
            assert r.reason, f"{r.id} is {r.verdict} without a reason"


def test_the_brief_topics_are_covered(rows):
    text = " ".join(r.claim for r in rows)
    for phrase in ("1.8T", "280B", "55B", "111B", "3,700 TFLOP", "13T", "7.5M", "2.15e25", "$63M", "$21.5M",
                   "~30 GB", "8.33", "33.33", "under 5%", "~300B", "3 TB", "MQA", "~130B", "~500 tokens",
                   "Davinci", "$0.0049", "$0.0021", "speculative", "150x"):
        assert phrase in text, phrase


def test_key_figures_are_judged_as_the_arithmetic_says(rows):
    by_id = {r.id: r for r in rows}
    assert by_id["M1"].verdict == REPRODUCED  # 1.83T
    assert by_id["M6"].verdict == INCONSISTENT and "unit slip" in by_id["M6"].reason  # 560 GFLOP, not TFLOP
    assert by_id["T4"].verdict == REPRODUCED  # 6 * 282B * 13T = 2.2e25
    assert by_id["E3"].verdict == INCONSISTENT  # PP16 micro-batches: ~32 tokens per expert read


def test_verdict_rules():
    assert verdict(Claimed("~10", 10), Finding("", "", value=10.9))[0] == REPRODUCED
    assert verdict(Claimed("~10", 10), Finding("", "", value=14))[0] == APPROXIMATE
    assert verdict(Claimed("~10", 10), Finding("", "", value=16))[0] == NOT_REPRODUCIBLE
    assert verdict(Claimed("< 5", 5, bound="<"), Finding("", "", value=4))[0] == REPRODUCED
    assert verdict(Claimed("90-100", 95, 90, 100), Finding("", "", value=99))[0] == REPRODUCED
    assert verdict(Claimed("90-100", 95, 90, 100), Finding("", "", value=105))[0] == APPROXIMATE
    assert verdict(Claimed("q"), Finding("", "", holds=False))[0] == NOT_REPRODUCIBLE
    assert verdict(Claimed("~10", 10), Finding("", "", value=10, inconsistency="x"))[0] == INCONSISTENT
    assert verdict(Claimed("~10", 10), Finding("", "", value=12))[1] == pytest.approx(0.2)


def test_table_lists_every_row(rows):
    table = article_table()
    for r in rows:
        assert f"{r.id} " in table and r.verdict.upper() in table


def test_docs_article_md_is_generated_from_the_article_table():
    assert DOC.read_text() == article_markdown(), "regenerate: moegpt plan --article --markdown > docs/article.md"
