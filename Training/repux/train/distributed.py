"""Data-parallel training under ``torchrun``: the same command on every process, one per device.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous address);
without them, or with a world size of 1, training runs as a single process. Processes use
the NCCL backend on CUDA (one GPU each, ``cuda:LOCAL_RANK``) and gloo on the CPU. Every rank
draws its own cases, DistributedDataParallel averages the gradients, and every optimizer
(the frequency-reparameterized one included, which only changes the update) then takes the
same step on every rank. Only rank 0 writes checkpoints, bundles and progress.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from repux.errors import InputError
from repux.infer.engine import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r}; expected a whole number (set by torchrun)") from None


def init_distributed(device: str = "auto") -> tuple[DistributedContext, torch.device]:
    """Join the process group when launched by ``torchrun``; pick this process's device.

    Args:
        device: "auto", "cpu", "cuda" or "cuda:N" (under torchrun a CUDA device is always
            ``cuda:LOCAL_RANK``).
    """
    context = DistributedContext(
        rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1), local_rank=_env_int("LOCAL_RANK", 0)
    )
    chosen = resolve_device(device)
    if not context.enabled:
        return context, chosen
    if chosen.type == "cuda":
        if context.local_rank >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK {context.local_rank} but only {torch.cuda.device_count()} CUDA device(s): "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        chosen = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return context, chosen


def shutdown_distributed(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def gather_objects(context: DistributedContext, value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` for a single process)."""
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(context: DistributedContext, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_buffers(context: DistributedContext, module: torch.nn.Module) -> None:
    """Make every rank's buffers equal: floating ones (BatchNorm statistics) averaged, others rank 0's.

    DistributedDataParallel averages gradients, so parameters stay equal, but each rank's
    BatchNorm updates its running statistics from its own patches: before validating,
    checkpointing or exporting, the ranks must agree on them.
    """
    if not context.enabled:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= context.world_size
        else:
            dist.broadcast(buffer, src=0)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state_dict's names and exact tensor bytes: equal digests, equal weights."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
