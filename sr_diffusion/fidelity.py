"""LR-consistency correction: the smallest change to an SR output that makes it explain its LR input.

With ``D`` the known degradation (downsampling by ``1/s`` with a named kernel, linear), an SR output
``x0`` is consistent with its input ``y`` when ``D x = y``. The correction is the orthogonal projection of
``x0`` onto that affine set,

    x = x0 + Dᵀ (D Dᵀ)⁻¹ (y − D x0),

the minimum-norm change (every pixel moves as little as possible in the L2 sense), so texture the
generator produced survives where it does not contradict the input. Every resize kernel acts on the two axes
separately, ``D x = A_h x A_wᵀ`` (:func:`sr_diffusion.resize.resize_matrix`), so ``D Dᵀ`` is the Kronecker
product of the small SPD matrices ``A_h A_hᵀ`` and ``A_w A_wᵀ`` and the projection is exact and cheap:

    x = x0 + P_hᵀ (y − A_h x0 A_wᵀ) P_w,   P = (A Aᵀ)⁻¹ A   (one Cholesky solve per axis),

two matrix products at the SR size, instead of an iterative solve.

Clamping to [0, 1] afterwards can break the equality near saturated pixels, so the projection and the clamp
alternate ``rounds`` times (projections onto convex sets). This is the "back-projection" step of classic
SR (Irani & Peleg 1991), solved exactly rather than by the iterative bicubic approximation.
"""

from __future__ import annotations

import torch

from sr_diffusion.resize import RESIZE_MODES, resize_matrix

__all__ = ["project_to_lr"]


def project_to_lr(
    sr: torch.Tensor,
    lr: torch.Tensor,
    *,
    mode: str = "matlab_bicubic",
    antialias: bool | None = None,
    rounds: int = 10,
    residual_rms: float = 1e-4,
) -> torch.Tensor:
    """Project ``sr`` onto ``{x : downsample(x) = lr}`` (then clamp to [0, 1]).

    Args:
        sr: ``(N, C, H, W)`` or ``(C, H, W)`` SR output in [0, 1].
        lr: ``(N, C, h, w)`` / ``(C, h, w)`` the LR input, in [0, 1], with ``H/h == W/w`` the SR factor.
        mode, antialias: the kernel ``D`` that made ``lr`` (:func:`sr_diffusion.resize.resize`); MATLAB bicubic
            by default, the kernel of published benchmarks and of this package's training data.
        rounds: projection + clamp alternations (≥ 1), at most; they stop once the LR residual's RMS is at most
            ``residual_rms`` (1e-4: 80 dB LR-consistency, far above the 45 dB that the NTIRE 2021 "Learning the
            Super-Resolution Space" challenge counts as consistent). Each projection is exact, so an image
            whose pixels stay inside [0, 1] needs one round; near saturated pixels each clamp undoes part of
            the projection, and photos with black or white areas need a few.

    Returns:
        ``x`` like ``sr`` (same shape and dtype), in [0, 1], with ``downsample(x) ≈ lr``.
    """
    if not isinstance(sr, torch.Tensor) or not isinstance(lr, torch.Tensor):
        raise TypeError("sr and lr must be torch tensors")
    if sr.ndim != lr.ndim or sr.ndim not in (3, 4) or sr.shape[:-2] != lr.shape[:-2]:
        raise ValueError(f"sr {tuple(sr.shape)} and lr {tuple(lr.shape)} must both be (C, H, W) or (N, C, H, W)")
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    (H, W), (h, w) = sr.shape[-2:], lr.shape[-2:]
    if H * w != W * h or H < h:
        raise ValueError(f"sr {W}x{H} is not a whole upscale of lr {w}x{h} (the same factor on both axes)")
    if not (torch.isfinite(sr).all() and torch.isfinite(lr).all()):
        raise ValueError("sr and lr must be finite (NaN or inf found)")
    unbatched = sr.ndim == 3
    x = (sr[None] if unbatched else sr).to(torch.float64)
    y = (lr[None] if unbatched else lr).to(x)

    a_h = resize_matrix(H, h, mode, antialias=antialias, device=x.device)  # (h, H)
    a_w = resize_matrix(W, w, mode, antialias=antialias, device=x.device)  # (w, W)
    p_h, p_w = _min_norm_inverse(a_h), _min_norm_inverse(a_w)

    for _ in range(rounds):
        residual = y - a_h @ x @ a_w.T
        if residual.square().mean().sqrt() <= residual_rms:  # consistent already (e.g. after a clamp changed nothing)
            break
        x = (x + p_h.T @ residual @ p_w).clamp(0, 1)
    out = x.to(sr.dtype)
    return out[0] if unbatched else out


def _min_norm_inverse(a: torch.Tensor) -> torch.Tensor:
    """``P = (A Aᵀ)⁻¹ A`` for an ``(m, n)`` matrix ``A`` (m ≤ n), so that ``Pᵀ`` is its minimum-norm right inverse.

    A Cholesky solve when ``A`` has full row rank (every antialiased or plain downsampling kernel here); the
    pseudo-inverse ``pinv(A)ᵀ`` otherwise, which gives the minimum-norm least-squares change instead.
    """
    chol, info = torch.linalg.cholesky_ex(a @ a.T)
    diagonal = chol.diagonal().abs()
    # cond(A Aᵀ) = cond(L)² ≥ (max / min of L's diagonal)²: refuse the solve when it would amplify rounding
    if int(info) == 0 and diagonal.min() > 1e-6 * diagonal.max():
        return torch.cholesky_solve(a, chol)
    return torch.linalg.pinv(a).T
