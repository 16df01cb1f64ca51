"""``moegpt train`` under torchrun, with one injected failure: on the first attempt, rank KILL_RANK
SIGKILLs itself as step KILL_STEP begins (after the step's samples are drawn), as a crashed GPU would.

Usage: kill_worker.py KILL_RANK KILL_STEP -- MOEGPT_TRAIN_ARGS...
"""

import os
import signal
import sys

import torch.distributed as dist

import moegpt.train.runtime as training
from moegpt.cli import main

kill_rank, kill_step = int(sys.argv[1]), int(sys.argv[2])
real_step = training.distributed_train_step


def step_that_dies(pm, *args, **kwargs):
    if (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and dist.get_rank() == kill_rank
            and step_that_dies.calls == kill_step - 1 - step_that_dies.first):
        os.kill(os.getpid(), signal.SIGKILL)
    step_that_dies.calls += 1
    return real_step(pm, *args, **kwargs)


step_that_dies.calls, step_that_dies.first = 0, 0
training.distributed_train_step = step_that_dies
sys.exit(main(["train", *sys.argv[4:]]))
