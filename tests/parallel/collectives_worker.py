"""Worker for test_serving_collectives (torch.distributed.run, 2 ranks): ``collectives_worker.py OUT.json``."""

import json
import sys

import torch
import torch.distributed as dist

from moegpt.infer.runner import Chunk
from moegpt.infer.sharded import PLAN_BYTES, exchange_plan
from moegpt.parallel.serving import SharedMemorySum


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, group = dist.get_rank(), dist.group.WORLD
    assert SharedMemorySum.applies(group, "cpu")
    shm = SharedMemorySum(group, slot_bytes=4096, timeout_s=5.0)
    exact = True
    for i, (shape, dtype) in enumerate([((8, 64), torch.float32), ((3, 5), torch.bfloat16), ((4, 1000), torch.float32)]
                                       * 20):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(100 * i + rank)).to(dtype)
        parts = [torch.empty_like(x) for _ in range(2)]
        dist.all_gather(parts, x)
        want = (parts[0].float() + parts[1].float()).to(dtype)  # in rank order, in fp32
        exact &= torch.equal(shm(x), want)  # (the last shape is past a slot: gloo's all-reduce)
    error = ""
    if rank == 0:  # rank 1 does not come: a one-line error within the timeout
        try:
            shm(torch.ones(4))
        except RuntimeError as e:
            error = str(e).splitlines()[0]
    dist.barrier()
    plans = []  # a plan within one broadcast, and one past it (a long block table per sequence)
    for n_blocks in (3, 4 * PLAN_BYTES):
        plan = ("run", [Chunk(tokens=(i,), start=5, block_table=tuple(range(n_blocks)), num_logits=1, seq_id=i)
                        for i in range(4)])
        plans.append(exchange_plan(plan if rank == 0 else None) == plan)
    if rank == 0:
        json.dump({"exact": exact, "error": error, "rounds": shm.seq}, open(out, "w"))
    else:
        json.dump({"plans": plans}, open(out + ".1", "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
