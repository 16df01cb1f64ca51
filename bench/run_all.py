"""`make bench`: every benchmark, one after another (never in parallel: timings would interfere)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ["bench.hf_parity", "bench.train_throughput", "bench.generate_throughput", "bench.decode_roofline", "bench.decode_paired",
           "bench.continuous_batching", "bench.expert_batch_sizes", "bench.plan_vs_engine", "bench.speculative", "bench.context_memory",
           "bench.serve_throughput", "bench.vision_serving", "bench.serve_layouts",
           "bench.llama_cpp"]  # (with llama-cpp-python installed: make bench-llama-cpp)

if __name__ == "__main__":
    failed = [m for m in BENCHES if subprocess.call([sys.executable, "-m", m], cwd=ROOT) != 0]
    sys.exit(f"failed: {failed}" if failed else 0)
