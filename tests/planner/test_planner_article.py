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


def test_our_values_are_computed_from_the_set_up_not_written_down(monkeypatch):
    """Change an input the article states and the figures derived from it move, verdicts with them:
    the rows are recomputed from the planner's formulas, not stored."""
    from moegpt.planner import scenarios

    before = {r.id: r for r in article_rows()}
    monkeypatch.setattr(scenarios, "TRAIN_A100", {**scenarios.TRAIN_A100, "tokens": 26e12})  # twice the tokens
    monkeypatch.setattr(scenarios, "SERVE_A100", {**scenarios.SERVE_A100, "hardware": "a100-80gb"})
    after = {r.id: r for r in article_rows()}

    def moved(i: str) -> float:  # ours after / ours before (rel_diff is ours / claimed - 1)
        return (1 + after[i].rel_diff) / (1 + before[i].rel_diff)

    assert moved("T4") == pytest.approx(2)  # 6 x active x tokens
    assert before["T4"].verdict == REPRODUCED and after["T4"].verdict != REPRODUCED  # 4.4e25 vs 2.15e25
    assert moved("T7") == pytest.approx(2, rel=0.01)  # the days, and so the cost, double
    assert moved("M1") == 1  # the parameter count depends on neither
    assert moved("C6") > 1.2  # on 80 GB A100s (2.0 vs 1.6 TB/s) the serving layout's users read faster


def test_key_figures_are_judged_as_the_arithmetic_says(rows):
    by_id = {r.id: r for r in rows}
    assert by_id["M1"].verdict == REPRODUCED  # 1.83T
    assert by_id["M6"].verdict == INCONSISTENT and "unit slip" in by_id["M6"].reason  # 560 GFLOP, not TFLOP
    assert by_id["T4"].verdict == REPRODUCED  # 6 * 282B * 13T = 2.2e25
    assert by_id["E3"].verdict == INCONSISTENT  # PP16 micro-batches: ~32 tokens per expert read
    assert by_id["E4"].verdict == INCONSISTENT  # 130B per node at FP16 is 32.5 GB per GPU, not < 30 GB
    assert by_id["E7"].verdict == REPRODUCED  # 120 layers / 15 nodes = 8, the 16th being the head node
    assert by_id["K6"].verdict == APPROXIMATE  # 4k sequences fit at a mean context of ~5.8k, not 8k
    assert by_id["T9"].verdict == NOT_REPRODUCIBLE  # 55 days needs 57% BF16 MFU on 8,192 H100s


def test_sample_claims_match_hand_arithmetic(rows):
    by_id = {r.id: r for r in rows}
    active, total = 281.98e9, 1834.4e9  # the gpt4 preset (README table: 282B, 1.83T)
    assert by_id["T4"].rel_diff == pytest.approx(6 * active * 13e12 / 2.15e25 - 1, abs=1e-3)
    assert by_id["T8"].rel_diff == pytest.approx(8192 * 55 * 24 * 2 / 21.5e6 - 1, abs=1e-3)
    assert by_id["E5"].rel_diff == pytest.approx(total * 2 / 128 / 30e9 - 1, abs=1e-3)
    assert by_id["D4"].rel_diff == pytest.approx(0)  # 60M x 2 / 16 = 7.5M
    # dense 1T on 8 H100s at batch 1: 8 x 3.35 TB/s / (1.009T x 2 B x 2 overhead) = 6.6 tokens/s
    assert by_id["I3"].rel_diff == pytest.approx(8 * 3350e9 / (1009.2e9 * 2 * 2) / (100 / 3) - 1, abs=1e-3)
    # the 4k-batch, PP16 per-user speed: 16 stages of 24.3 ms (weights 28.7 GB + KV 8.05 GB at 1.555 TB/s + comm)
    assert by_id["C6"].rel_diff == pytest.approx(1 / (16 * 24.3e-3) / (25 / 3) - 1, abs=0.01)


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
