"""Sparsity regularizers: tiny callables on a batch of sparse vectors ``w`` of shape (batch B, vocab V), w >= 0.

In naver/splade's style each is a function of the representations only; the trainer multiplies it by its lambda.

    L1 FLOPS (FLES-1 default)   L1(w)    = sum_v mean_b |w[b, v]|          = mean_b ||w_b||_1
    squared FLOPS (classic)     FLOPS(w) = sum_v (mean_b |w[b, v]|)^2      (Paria et al. 2020, SPLADE)
    anti-collapse               AC(w)    = mean_b ReLU(1 - ||w_b||_1 / m)^2,   m = min_mass

L1 FLOPS pushes every document's own mass down (its gradient, 1/B per active entry, does not vanish as the batch
mean shrinks), so it acts on the per-document non-zero count that CLFR controls; the squared FLOPS mostly
penalises terms that are active across the batch. The anti-collapse term is zero while a document keeps at least
``min_mass`` total weight and pushes back (quadratically) as its vector empties, which keeps a controller that
raises lambda_d from driving documents to the empty vector.

    >>> import torch
    >>> from fles1.training.regularizers import l1_flops, squared_flops, anti_collapse
    >>> w = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 2.0]])
    >>> float(l1_flops(w)), float(squared_flops(w)), float(anti_collapse(w, min_mass=4.0))
    (2.5, 4.25, 0.15625)
"""

import torch


def l1_flops(reps: torch.Tensor) -> torch.Tensor:
    """sum_v mean_b |w[b, v]|."""
    return reps.abs().sum(dim=-1).mean()


def squared_flops(reps: torch.Tensor) -> torch.Tensor:
    """sum_v (mean_b |w[b, v]|)^2 -- the classic FLOPS regularizer."""
    return reps.abs().mean(dim=0).pow(2).sum()


def anti_collapse(reps: torch.Tensor, min_mass: float = 5.0) -> torch.Tensor:
    """mean_b ReLU(1 - ||w_b||_1 / min_mass)^2: zero unless a vector's total weight falls below ``min_mass``."""
    if not min_mass > 0:  # NaN too
        raise ValueError(f"min_mass must be > 0, got {min_mass!r}")
    mass = reps.abs().sum(dim=-1)
    return torch.relu(1.0 - mass / min_mass).pow(2).mean()


REGULARIZERS = {"l1_flops": l1_flops, "flops": squared_flops}


def get_regularizer(name: str):
    if not isinstance(name, str) or name not in REGULARIZERS:  # a list or mapping: unhashable, a TypeError
        raise ValueError(f"regularizer={name!r} is not supported; choose one of {sorted(REGULARIZERS)}")
    return REGULARIZERS[name]
