"""The collectives the training code needs (no-ops in a single process): a sum over ranks, the rank, the world size."""

import os

import torch
import torch.distributed as dist


def all_reduce_sum(values, device=None) -> list[float]:
    """Sum a list of floats over all ranks (float64, so counts stay exact)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    if device is None or dist.get_backend() == "gloo":
        device = torch.device("cpu")
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def sums_onto_first_rank(values, device=None) -> list[float]:
    """Every rank's values summed onto rank 0, zeros on the others: what a checkpoint (written by rank 0) saves of
    per-rank running sums, whose total over ranks is unchanged. Every rank must call it at the same point."""
    totals = all_reduce_sum(values, device)
    return totals if rank() == 0 else [0.0] * len(totals)


def first_rank_only(values) -> list[float]:
    """Sums read back from a checkpoint: rank 0 carries them on, the others start from zero (else a resumed run
    counted them once per rank)."""
    return [float(v) for v in values] if rank() == 0 else [0.0] * len(values)


def rank() -> int:
    from sentence_transformers.util.distributed import get_rank  # 0 when not distributed

    return get_rank()


def world_size() -> int:
    from sentence_transformers.util.distributed import get_world_size  # 1 when not distributed

    return get_world_size()


def launched_world_size() -> int:
    """The processes torchrun (or accelerate launch) started, from WORLD_SIZE: known before the process group is
    set up (what `world_size` reads), so before any loading."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1
