"""Several processes share one prune when torchrun launches them: which rank does what, and how results meet.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; `process_group` joins the group (gloo on CPU, nccl on CUDA, each
rank on its LOCAL_RANK GPU) for the length of a prune. Work is cut into *blocks* whose boundaries do not depend on
the number of processes (calibration sequences, selection batches, offspring); block k belongs to rank k mod world.
A rank computes its blocks; every rank then receives every block from its owner and combines them in block order,
so all ranks hold the same bytes, and one process (which owns every block) computes the same bytes too.

Rank 0 alone writes files; the others wait at a barrier where they next read them. Without a process group every
function here is the single-process case.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from tyr.errors import TyrError


def launched_world() -> int:
    """How many processes torchrun started for this job (1 when it did not start this one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as err:
        raise TyrError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from err


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group for the block and yield this rank's device; without torchrun (or with one
    process) nothing is joined and ``device`` comes back as it is."""
    if launched_world() == 1 or dist.is_initialized():
        yield device
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index not in (None, local_rank):
            raise TyrError(f"under torchrun each rank uses the GPU of its LOCAL_RANK; pass --device cuda, "
                           f"not {device}")
        if local_rank >= torch.cuda.device_count():
            raise TyrError(f"torchrun started rank {local_rank} on a machine where torch sees "
                           f"{torch.cuda.device_count()} GPU(s): one process per GPU, or --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def backend() -> str | None:
    return dist.get_backend() if _active() else None


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (after rank 0 wrote what the others read next)."""
    if _active():
        dist.barrier()


def owner(block: int) -> int:
    return block % world_size()


def owned(num_blocks: int) -> list[int]:
    """The blocks this rank computes."""
    return list(range(rank(), num_blocks, world_size()))


def share_rows(tensor: torch.Tensor, blocks: Sequence[slice]) -> None:
    """Fill ``tensor[blocks[k]]`` (slices of its first dimension) on every rank from the rank that owns block k."""
    if not _active():
        return
    for k, rows in enumerate(blocks):
        _broadcast(tensor[rows], owner(k))


def sum_in_order(partials: dict[int, torch.Tensor], num_blocks: int, shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """Σ_k partials[k] over all ``num_blocks`` blocks of ``shape``, added in block order on every rank (each rank
    passes the blocks it owns): the same bytes whatever the number of ranks."""
    total = None
    for k in range(num_blocks):
        part = partials.get(k)
        if _active():
            if part is None:
                part = torch.empty(tuple(shape), dtype=dtype, device=device)
            _broadcast(part, owner(k))
        total = part.clone() if total is None else total.add_(part)
    return total


def _broadcast(tensor: torch.Tensor, source: int) -> None:
    """Broadcast in place; nccl only moves GPU tensors, so CPU ones travel through a GPU copy there."""
    if not tensor.is_contiguous():
        raise ValueError("only contiguous blocks can be shared")
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        staged = tensor.to(_device())
        dist.broadcast(staged, src=source)
        tensor.copy_(staged.to(tensor.device))
        return
    dist.broadcast(tensor, src=source)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_floats(values: Sequence[float]) -> list[list[float]]:
    """Every rank's ``values``, in rank order, on every rank (float64 travels exactly; no pickling)."""
    if not _active():
        return [list(values)]
    device = _device()
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(lengths, torch.tensor([len(values)], dtype=torch.int64, device=device))
    longest = max(int(n) for n in lengths)
    mine = torch.zeros(longest, dtype=torch.float64, device=device)
    mine[:len(values)] = torch.tensor(list(values), dtype=torch.float64)
    gathered = [torch.empty(longest, dtype=torch.float64, device=device) for _ in range(world_size())]
    dist.all_gather(gathered, mine)
    return [row[:int(n)].tolist() for row, n in zip(gathered, lengths)]
