"""Calibration spread over processes with PyTorch's distributed package.

``torchrun --nproc-per-node N -m lrquant quantize ...`` (``--nnodes`` for several machines)
starts N copies of the command; each sees the same calibration windows and keeps the chains of
its share (window ``i`` belongs to process ``i mod N``). Every block is learned by all of them
at once: statistics (activation ranges, clipping search sums, GPTQ Hessians) and, at every
training step, the loss terms and the gradients are summed over the processes, so each holds the
same transforms and computes what one process would with the same global ``batch_size`` (up to
the order of floating-point sums). Process 0 writes the resume store and the output; the others
only learn. gloo on the CPU, NCCL on GPUs.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every function here is a no-op for one process.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from lrquant.errors import LrquantError

# seconds a process waits for the others at a collective step before it gives up
TIMEOUT_S = float(os.environ.get("LRQUANT_DIST_TIMEOUT", "1800"))


def start(device: torch.device) -> None:
    """Join the process group ``torchrun`` set up (its environment), once; gloo on the CPU,
    NCCL on a GPU (each process on the GPU of its local rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    with errors():
        dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
    # leave the group before the interpreter exits: a process that exits with the backend's
    # threads still running may abort ("terminate called without an active exception")
    atexit.register(stop)
    if rank() != 0:  # process 0 tells the user what happens
        logging.getLogger("lrquant").setLevel(logging.WARNING)


def world() -> int:
    """How many processes learn together (1 without ``torchrun``)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's number (0 writes the output)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def owned(n: int) -> torch.Tensor:
    """The windows (of ``n``) whose chains this process keeps: ``rank, rank + N, ...``."""
    return torch.arange(rank(), n, world())


def device_of_group(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` where the process group's backend can reduce it (NCCL: the GPU)."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.cuda()
    return tensor


def reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` summed (``sum``), or its elementwise ``min``/``max``, over the processes, in
    place; returned for chaining."""
    if world() == 1:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    shared = device_of_group(tensor)
    with errors():
        dist.all_reduce(shared, ops[op])
    if shared is not tensor:
        tensor.copy_(shared)
    return tensor


def reduce_grads_(parameters: list[torch.Tensor]) -> None:
    """Sum the gradients of ``parameters`` over the processes (one flat buffer, one call)."""
    if world() == 1:
        return
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in grads])
    reduce_(flat)
    offset = 0
    for p in grads:
        p.grad.copy_(flat[offset : offset + p.grad.numel()].view_as(p.grad))
        offset += p.grad.numel()


def gather_windows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every process's windows ``[share, ...]`` (as :func:`owned` split them) back in their
    order ``[n, ...]``, on every process."""
    if world() == 1:
        return local
    if local.dtype == torch.bfloat16:  # gathered as its bits (not every backend has bf16)
        return gather_windows(local.view(torch.int16), n).view(torch.bfloat16)
    size = -(-n // world())  # shares differ by one window at most: pad to the largest
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [device_of_group(torch.empty_like(padded)) for _ in range(world())]
    with errors():
        dist.all_gather(parts, device_of_group(padded))
    out = local.new_empty((n, *local.shape[1:]))
    for r, part in enumerate(parts):
        rows = torch.arange(r, n, world())
        out[rows] = part[: rows.numel()].to(local.device)
    return out


def barrier() -> None:
    if world() > 1:
        with errors():
            dist.barrier()


def stop() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def errors() -> Iterator[None]:
    """A collective step that fails because another process stopped or timed out, as one clear
    error (instead of a backend traceback)."""
    try:
        yield
    except (dist.DistError, RuntimeError) as err:
        if isinstance(err, LrquantError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LrquantError(
            f"process {rank()} of {world()}: the processes lost each other ({first[:200]}); another "
            f"process stopped or did not answer within {TIMEOUT_S:.0f} s (LRQUANT_DIST_TIMEOUT): see "
            "its output for the cause, then rerun the same command to resume"
        ) from None
