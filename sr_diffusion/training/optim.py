"""Optimizer and learning-rate schedule from the ``optim`` config section."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["build_optimizer", "build_lr_scheduler", "lr_factor"]


def build_optimizer(parameters: Iterable[torch.nn.Parameter], optim_config) -> torch.optim.Optimizer:
    """``adam`` → ``torch.optim.Adam``, ``adamw`` → ``torch.optim.AdamW`` with ``lr``, ``betas``, ``eps``,
    ``weight_decay`` (Adam's is L2 in the gradient, AdamW's decoupled)."""
    params = [p for p in parameters if p.requires_grad]
    kwargs = dict(
        lr=optim_config.lr,
        betas=tuple(optim_config.betas),
        eps=optim_config.eps,
        weight_decay=optim_config.weight_decay,
    )
    if optim_config.name == "adam":
        return torch.optim.Adam(params, **kwargs)
    if optim_config.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise ValueError(f"unknown optimizer {optim_config.name!r}; choose adam or adamw")


def lr_factor(step: int, optim_config, max_steps: int) -> float:
    """Multiplier of ``optim.lr`` after ``step`` optimizer steps.

    Linear warmup ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, times: 1 (``constant``);
    ``gamma ** #{m in milestones: step >= m}`` (``multistep``); or, for ``cosine``,
    ``r + (1 - r) · (1 + cos(π · t)) / 2`` with ``t = (step - warmup) / (max_steps - warmup)`` clipped to
    [0, 1] and ``r = min_lr / lr``.
    """
    o = optim_config
    warmup = (step + 1) / o.warmup_steps if step < o.warmup_steps else 1.0
    if o.scheduler == "constant":
        decay = 1.0
    elif o.scheduler == "multistep":
        decay = o.gamma ** sum(step >= m for m in o.milestones)
    elif o.scheduler == "cosine":
        span = max(1, max_steps - o.warmup_steps)
        t = min(1.0, max(0.0, (step - o.warmup_steps) / span))
        ratio = o.min_lr / o.lr
        decay = ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * t))
    else:
        raise ValueError(f"unknown scheduler {o.scheduler!r}; choose constant, cosine or multistep")
    return warmup * decay


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_config, max_steps: int, num_processes: int = 1):
    """A ``LambdaLR`` following :func:`lr_factor`.

    ``accelerate`` steps a prepared scheduler once per process at every optimizer step (as in the
    diffusers examples), so the scheduler's own counter is divided by ``num_processes`` here.
    """
    num_processes = max(1, int(num_processes))
    return LambdaLR(optimizer, lambda i: lr_factor(i // num_processes, optim_config, max_steps))
