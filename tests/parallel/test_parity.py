"""Every parallel layout trains with the numbers of one process: per-step losses, final weights and
per-expert token counts, on CPU with gloo at 2 and 4 ranks (one launch per world size); the
``-packed`` layouts on fine-tuning's packed conversation rows."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from launch import HERE, torchrun  # noqa: E402

TWO = ["dp2", "zero1-dp2", "fsdp-dp2", "tp2", "tp2-gqa", "ep2", "pp2-gpipe", "pp2-1f1b", "pp2-interleaved",
       "dp2-packed", "tp2-packed", "ep2-packed", "fsdp-dp2-packed"]
FOUR = ["dp4", "zero1-dp4", "fsdp-dp4", "hsdp-2x2", "tp2xdp2", "tp2xfsdp2", "pp2xdp2", "ep2xdp2", "ep4", "ep2xtp2",
        "pp2xtp2", "pp2xep2", "zero1-tp2xdp2", "zero1-pp2xtp2",
        "fsdp-pp2xdp2", "fsdp-ep2xdp2", "tp2xdp2-packed", "ep2xdp2-packed"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    torchrun(2, [str(HERE / "parity_worker.py"), str(out), *TWO])
    torchrun(4, [str(HERE / "parity_worker.py"), str(out), *FOUR])
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


@pytest.mark.parametrize("layout", TWO + FOUR)
def test_layout_matches_one_process_losses_weights_and_expert_counts(results, layout):
    r = results[layout]
    assert len(r["losses"]) >= 5
    for step, (got, want) in enumerate(zip(r["losses"], r["ref_losses"])):
        assert got == pytest.approx(want, rel=1e-4), f"{layout} step {step + 1}: {got} != {want}"
    assert r["same_keys"], layout
    assert r["weights_mismatch"] is None, f"{layout}: {r['weights_mismatch']}"
    assert r["counts_equal"], f"{layout}: expert counts summed over ranks differ from one process"
