"""Running a test's workers as the ranks of a 2-process gloo group on the CPU, as torchrun
starts them (shared by the distributed training and the sharded retrieval tests)."""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun_rank(rank: int, port: int) -> None:
    """The environment torchrun gives ``rank`` of WORLD, one thread per process."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)


def spawn(worker, *args) -> None:
    """Runs ``worker(rank, *args)`` in WORLD spawned processes; fails after TIMEOUT_S."""
    context = mp.start_processes(worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} gloo workers did not finish within {TIMEOUT_S} s")
