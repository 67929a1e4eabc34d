"""Pixel losses for SR training: L1, MSE and Charbonnier, on (N, C, H, W) tensors."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CharbonnierLoss", "build_loss", "LOSSES"]


class CharbonnierLoss(nn.Module):
    r"""Charbonnier loss (a differentiable L1), Lai et al., LapSRN, Eq. 3:
    :math:`\frac{1}{N}\sum \sqrt{(x - y)^2 + \varepsilon^2}`, with ``eps`` = ε (default 1e-3)."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((input - target).pow(2) + self.eps**2).mean()


LOSSES = ("l1", "mse", "charbonnier")


def build_loss(name: str, charbonnier_eps: float = 1e-3) -> nn.Module:
    """``"l1"`` → ``nn.L1Loss``, ``"mse"`` → ``nn.MSELoss``, ``"charbonnier"`` → :class:`CharbonnierLoss`
    (mean reduction)."""
    if name == "l1":
        return nn.L1Loss()
    if name == "mse":
        return nn.MSELoss()
    if name == "charbonnier":
        return CharbonnierLoss(charbonnier_eps)
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
