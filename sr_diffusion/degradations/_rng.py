"""Scalar random draws from an explicit ``torch.Generator``.

Every random number in :mod:`sr_diffusion.degradations` comes from a generator the caller passes in; none
from ``random``, ``numpy.random`` or torch's global generator. These helpers draw on the generator's own
device (a CUDA generator only makes CUDA tensors) and hand back Python numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["bernoulli", "categorical", "check_generator", "permutation", "randint", "uniform"]


def check_generator(generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator, got {type(generator).__name__}; every random draw of "
            "the degradation model comes from it (e.g. torch.Generator().manual_seed(0))."
        )
    return generator


def uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    """One draw from U[low, high) (float64)."""
    u = torch.rand((), generator=generator, device=generator.device, dtype=torch.float64).item()
    return low + (high - low) * u


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """One integer drawn uniformly from {low, ..., high} (``high`` included, like ``random.randint``)."""
    return int(torch.randint(low, high + 1, (), generator=generator, device=generator.device).item())


def bernoulli(generator: torch.Generator, p: float) -> bool:
    """True with probability ``p`` (``p=0`` never, ``p=1`` always)."""
    return uniform(generator) < p


def categorical(generator: torch.Generator, probs: Sequence[float]) -> int:
    """Index ``i`` drawn with probability ``probs[i] / sum(probs)`` (like ``random.choices``)."""
    total = float(sum(probs))
    u = uniform(generator, 0.0, total)
    acc = 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc and p > 0:
            return i
    return max(i for i, p in enumerate(probs) if p > 0)  # u landed on the float edge of the last bin


def permutation(generator: torch.Generator, n: int) -> list[int]:
    """A random permutation of ``range(n)``."""
    return torch.randperm(n, generator=generator, device=generator.device).tolist()
