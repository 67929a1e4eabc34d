"""Pixel losses for SR training: L1, MSE and Charbonnier, on (N, C, H, W) tensors, and a sub-pixel phase-bias
penalty against the x``r`` mesh."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CharbonnierLoss", "PhaseBiasLoss", "phase_bias", "build_loss", "LOSSES"]


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


def phase_bias(error: torch.Tensor, period: int) -> torch.Tensor:
    """The systematic part of an ``r``-periodic mesh in ``error`` (N, C, H, W), ``r`` = ``period``: the mean error at
    each sub-pixel phase ``(y mod r, x mod r)`` less its mean over the phases, shape (N, C, r, r).

    By the DFT over the ``r × r`` phases this is exactly the error's content at the frequencies ``(a/r, b/r)``
    (except 0), where a sub-pixel mesh puts its spectral peaks (H and W are cropped to multiples of ``r``)."""
    n, c, h, w = error.shape
    h, w = h - h % period, w - w % period
    per_phase = error[..., :h, :w].reshape(n, c, h // period, period, w // period, period).mean((2, 4))
    return per_phase - per_phase.mean((-2, -1), keepdim=True)


class PhaseBiasLoss(nn.Module):
    r"""``base(x, y) + weight · mean |phase_bias(x - y, period)|``: a pixel loss plus an L1 penalty on the error's
    per-phase offsets (:func:`phase_bias`). A pixel loss alone weighs a faint mesh by its tiny share of the error;
    this term asks every sub-pixel phase of a crop to be right on average, as the HR (and bicubic) are."""

    def __init__(self, base: nn.Module, weight: float, period: int):
        super().__init__()
        if weight < 0 or period < 2:
            raise ValueError(f"need weight >= 0 and period >= 2, got {weight}, {period}")
        self.base, self.weight, self.period = base, float(weight), int(period)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        penalty = phase_bias(input - target, self.period).abs().mean()
        return self.base(input, target) + self.weight * penalty


LOSSES = ("l1", "mse", "charbonnier")


def build_loss(name: str, charbonnier_eps: float = 1e-3, phase_bias_weight: float = 0.0, period: int = 4) -> nn.Module:
    """``"l1"`` → ``nn.L1Loss``, ``"mse"`` → ``nn.MSELoss``, ``"charbonnier"`` → :class:`CharbonnierLoss`
    (mean reduction); with ``phase_bias_weight > 0`` wrapped in :class:`PhaseBiasLoss` of that ``period``."""
    if name == "l1":
        loss = nn.L1Loss()
    elif name == "mse":
        loss = nn.MSELoss()
    elif name == "charbonnier":
        loss = CharbonnierLoss(charbonnier_eps)
    else:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return PhaseBiasLoss(loss, phase_bias_weight, period) if phase_bias_weight > 0 else loss
