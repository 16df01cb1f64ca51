"""The collectives of sharded serving between two ranks: the shared-memory sum of ranks on one
machine (parallel/serving.py, kernels/shm_sum.cpp) is the sum of every rank's tensor in rank order,
on every rank, round after round, larger tensors through gloo, and a rank that does not come is a
one-line error after the timeout; rank 0's step plans reach the other ranks whole, short or long."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from launch import HERE, torchrun  # noqa: E402


def test_ranks_sum_through_shared_memory(tmp_path):
    out = tmp_path / "shm.json"
    torchrun(2, [str(HERE / "collectives_worker.py"), str(out)])
    r = json.loads(out.read_text())
    assert r["exact"]
    assert r["rounds"] == 41  # 40 through the segment (20 were past a slot), then the lone call
    assert "rank 1 of the group did not arrive within 5" in r["error"], r
    assert json.loads((tmp_path / "shm.json.1").read_text())["plans"] == [True, True]
