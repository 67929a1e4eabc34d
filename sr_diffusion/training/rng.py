"""Random draws of a training step, batched or one generator per sample.

A task's ``compute_loss`` receives either one ``torch.Generator`` for the micro-batch or, when the task sets
:attr:`~sr_diffusion.training.TrainingTask.per_sample_generators`, a list with one generator per sample, seeded
by the sample's position in the run's stream (see :mod:`sr_diffusion.training.trainer`). With a list, sample
``i``'s draws depend only on ``generators[i]``: a global batch gets the same noise and timesteps however it is
split across processes or accumulation micro-batches. These helpers take either form, so a task written with
them runs both ways (tests call ``compute_loss`` with a single generator).

The list form follows diffusers' ``randn_tensor``, which also accepts one generator per batch element.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["GeneratorArg", "rand", "randint", "randn"]

GeneratorArg = torch.Generator | Sequence[torch.Generator]


def _per_sample(generator: GeneratorArg, n: int) -> Sequence[torch.Generator] | None:
    if isinstance(generator, torch.Generator):
        return None
    if len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for a batch of {n}")
    return generator


def randint(
    low: int, high: int, n: int, generator: GeneratorArg, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(n,)`` int64 uniform on ``[low, high)``, like ``torch.randint(low, high, (n,), generator=...)``."""
    gens = _per_sample(generator, n)
    if gens is None:
        return torch.randint(low, high, (n,), generator=generator, device=device)
    return torch.cat([torch.randint(low, high, (1,), generator=g, device=device) for g in gens])


def rand(n: int, generator: GeneratorArg, device: torch.device | str | None = None) -> torch.Tensor:
    """``(n,)`` float32 uniform on ``[0, 1)``, like ``torch.rand(n, generator=...)``."""
    gens = _per_sample(generator, n)
    if gens is None:
        return torch.rand(n, generator=generator, device=device)
    return torch.cat([torch.rand(1, generator=g, device=device) for g in gens])


def randn(
    shape: Sequence[int],
    generator: GeneratorArg,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal of ``shape`` (``shape[0]`` is the batch), like ``torch.randn(shape, generator=...)``."""
    shape = tuple(int(s) for s in shape)
    gens = _per_sample(generator, shape[0])
    if gens is None:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in gens])
