"""LR-consistency correction: the smallest change to an SR output that makes it explain its LR input.

With ``D`` the known degradation (downsampling by ``1/s`` with a named kernel, linear), an SR output
``x0`` is consistent with its input ``y`` when ``D x = y``. The correction is the orthogonal projection of
``x0`` onto that affine set,

    x = x0 + Dᵀ (D Dᵀ)⁻¹ (y − D x0),

the minimum-norm change (every pixel moves as little as possible in the L2 sense), so texture the
generator produced survives where it does not contradict the input. ``(D Dᵀ) u = r`` is solved by conjugate
gradients on the LR grid (``D Dᵀ`` is symmetric positive definite for the antialiased downsampling
kernels); ``Dᵀ`` is the adjoint of the resize, computed by autograd, since the resize is linear.

Clamping to [0, 1] afterwards can break the equality near saturated pixels, so the projection and the clamp
alternate ``rounds`` times (projections onto convex sets). This is the "back-projection" step of classic
SR (Irani & Peleg 1991), solved exactly rather than by the iterative bicubic approximation.
"""

from __future__ import annotations

import torch

from sr_diffusion.resize import RESIZE_MODES, resize

__all__ = ["project_to_lr"]


def project_to_lr(
    sr: torch.Tensor,
    lr: torch.Tensor,
    *,
    mode: str = "matlab_bicubic",
    antialias: bool | None = None,
    rounds: int = 10,
    max_iterations: int = 50,
    tolerance: float = 1e-5,
    residual_rms: float = 1e-3,
) -> torch.Tensor:
    """Project ``sr`` onto ``{x : downsample(x) = lr}`` (then clamp to [0, 1]).

    Args:
        sr: ``(N, C, H, W)`` or ``(C, H, W)`` SR output in [0, 1].
        lr: ``(N, C, h, w)`` / ``(C, h, w)`` the LR input, in [0, 1], with ``H/h == W/w`` the SR factor.
        mode, antialias: the kernel ``D`` that made ``lr`` (:func:`sr_diffusion.resize.resize`); MATLAB bicubic
            by default, the kernel of published benchmarks and of this package's training data.
        rounds: projection + clamp alternations (≥ 1), at most; they stop once the LR residual's RMS is at most
            ``residual_rms`` (1e-3: 60 dB LR-consistency, well above the 45 dB that the NTIRE 2021 "Learning the
            Super-Resolution Space" challenge counts as consistent; 1e-4 (80 dB) costs about 2.5x the time on a
            photo). Near saturated pixels each clamp undoes part of the projection, so
            photos with black or white areas need several rounds to reach 40 dB and more.
        max_iterations: conjugate-gradient iterations per projection (at most).
        tolerance: stop CG once ``‖r‖ ≤ tolerance · ‖r₀‖`` for every image.

    Returns:
        ``x`` like ``sr`` (same shape and dtype), in [0, 1], with ``downsample(x) ≈ lr``.
    """
    if not isinstance(sr, torch.Tensor) or not isinstance(lr, torch.Tensor):
        raise TypeError("sr and lr must be torch tensors")
    if sr.ndim != lr.ndim or sr.ndim not in (3, 4) or sr.shape[:-2] != lr.shape[:-2]:
        raise ValueError(f"sr {tuple(sr.shape)} and lr {tuple(lr.shape)} must both be (C, H, W) or (N, C, H, W)")
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    if rounds < 1 or max_iterations < 1:
        raise ValueError("rounds and max_iterations must be >= 1")
    (H, W), (h, w) = sr.shape[-2:], lr.shape[-2:]
    if H * w != W * h or H < h:
        raise ValueError(f"sr {W}x{H} is not a whole upscale of lr {w}x{h} (the same factor on both axes)")
    if not (torch.isfinite(sr).all() and torch.isfinite(lr).all()):
        raise ValueError("sr and lr must be finite (NaN or inf found)")
    unbatched = sr.ndim == 3
    x = (sr[None] if unbatched else sr).to(torch.float64)
    y = (lr[None] if unbatched else lr).to(x)

    def down(t: torch.Tensor) -> torch.Tensor:
        return resize(t, size=(h, w), mode=mode, antialias=antialias)

    def down_adjoint(v: torch.Tensor) -> torch.Tensor:
        probe = torch.zeros_like(x, requires_grad=True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(down(probe), probe, grad_outputs=v)
        return grad

    for _ in range(rounds):
        with torch.no_grad():
            residual = y - down(x)
        if residual.square().mean().sqrt() <= residual_rms:  # consistent already (e.g. after a clamp changed nothing)
            break
        x = (x + down_adjoint(_conjugate_gradient(lambda u: down(down_adjoint(u)), residual, max_iterations,
                                                  tolerance))).clamp(0, 1)
    out = x.to(sr.dtype)
    return out[0] if unbatched else out


def _conjugate_gradient(apply_a, b: torch.Tensor, max_iterations: int, tolerance: float) -> torch.Tensor:
    """Solve ``A u = b`` per image (A symmetric positive definite, given as a function) by CG."""
    dims = tuple(range(1, b.ndim))
    u = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(dims, keepdim=True)
    stop = (tolerance**2) * rr
    for _ in range(max_iterations):
        if bool((rr <= stop).all()):
            break
        with torch.no_grad():
            ap = apply_a(p)
        alpha = rr / (p * ap).sum(dims, keepdim=True).clamp_min(1e-300)
        u = u + alpha * p
        r = r - alpha * ap
        rr_next = (r * r).sum(dims, keepdim=True)
        p = r + (rr_next / rr.clamp_min(1e-300)) * p
        rr = rr_next
    return u
