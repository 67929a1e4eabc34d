"""Training targets of the degradation estimator: what the Real-ESRGAN second-order degradation did to each image,
as three physical quantities measured on the LR grid.

:func:`degrade_with_targets` degrades an HR batch with :class:`~sr_diffusion.degradations.RealESRGANDegradation`
(Wang et al., 2021, Sec. 3, Fig. 2: ``blur -> resize -> noise -> JPEG``, twice, then ``[resize + sinc]`` and JPEG in a
random order) and returns the LR batch with a :class:`~sr_diffusion.estimation.DegradationEstimate` of targets built
from the parameters the degradation itself sampled. The second-order chain has no single "blur sigma" or "noise
sigma", so each target is defined as the equivalent of one first-order operation on the LR grid:

``blur_sigma`` (LR pixels)
    The standard deviation of the isotropic Gaussian blur whose frequency response falls to 1/2 at the same
    frequency as the chain's. With the LR pixel as the unit of length, the chain's response is the product of

    * ``kernel1``, applied on the HR grid (pitch ``1/s``),
    * ``kernel2``, applied on the first resized grid (pitch ``h / (s · h1)``, ``h1 = int(h · f1)``),
    * the final sinc filter, applied on the LR grid (pitch 1), and
    * the resampling bottleneck, an ideal low-pass at the Nyquist frequency ``pi / p_max`` of the coarsest grid the
      image passed through (``p_max = max(h / (s · h1), (h / s) / h2, 1)``, ``h2 = int(h / s · f2)``; the LR grid
      itself is one of them),

    where a kernel ``k`` applied on a grid of pitch ``p`` has the response ``H(w) = sum_x k(x) cos(p · w . x)``
    (the kernels are point-symmetric). The product is averaged over 8 directions, ``w_half`` is the first radial
    frequency where it is at most 1/2 (linear interpolation on 64 steps up to ``pi``) and
    ``blur_sigma = sqrt(2 ln 2) / w_half`` (a Gaussian's response ``exp(-sigma^2 w^2 / 2)`` is 1/2 there). The
    smallest value, ``sqrt(2 ln 2) / pi ~ 0.375``, means "as sharp as the LR grid allows". Interpolation filters are
    not modelled beyond the bottleneck.

``noise_sigma`` (0..255 scale)
    The standard deviation of the noise as the LR image shows it: the difference between the LR image and the same
    degradation replayed without its noise (every draw the same: the noise stages still draw their noise, so nothing
    after them changes, but do not add it), over all pixels and channels. Everything after a noise stage acts on its
    noise as on the image: the resizes and filters blur it, the JPEG compressions remove part of it (what they do
    differently to the noisy image counts as noise), and clamping and the 8-bit rounding apply. Noise that a JPEG
    removed is not part of the target: the LR image carries no trace of it.

``jpeg_quality`` (1..100)
    The quality of the JPEG compression the LR grid shows: that of the final JPEG when its 8x8 blocks lie on the LR
    grid, i.e. when it is the chain's last operation or the final resize it precedes keeps the size (the sinc filter
    then only blurs the blocks in place); 100 otherwise. A JPEG whose blocks are resampled afterwards is not part of the
    target: the first stage's (its blocks lie on an intermediate grid and are blurred, resized and noised afterwards),
    and the final one when the final resize changes the size (measured before this definition: the estimator could not
    tell its quality from the mean's, 1.17x the predict-the-mean error against 0.27x where the blocks stay on the LR
    grid).

The parameters are read by a private subclass of the degradation that records its batch-wide resize draws while running
the unchanged degradation code (same draws, bit-identical LR images); a second subclass replays it without the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sr_diffusion.degradations import RealESRGANDegradation
from sr_diffusion.degradations.ops import INTERPOLATION_MODES

__all__ = ["BLUR_SIGMA_MIN", "degrade_with_targets", "effective_blur_sigma"]

#: ``sqrt(2 ln 2) / pi``: the smallest ``blur_sigma`` (a response that stays above 1/2 up to the LR Nyquist frequency).
BLUR_SIGMA_MIN = math.sqrt(2 * math.log(2)) / math.pi

_NUM_RADII = 64
_NUM_ANGLES = 8


# ----------------------------------------------------------------------------------------------------------------------
# Blur: the half-amplitude frequency of the chain's response
# ----------------------------------------------------------------------------------------------------------------------


def _frequency_grid(device) -> tuple[torch.Tensor, torch.Tensor]:
    """Radii ``(R,)`` in (0, pi] and unit directions ``(A, 2)`` over a half circle (the responses are even)."""
    radii = torch.arange(1, _NUM_RADII + 1, dtype=torch.float64, device=device) * (math.pi / _NUM_RADII)
    angles = torch.arange(_NUM_ANGLES, dtype=torch.float64, device=device) * (math.pi / _NUM_ANGLES)
    return radii, torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def _kernel_response(
    kernel: torch.Tensor, pitch: torch.Tensor, radii: torch.Tensor, dirs: torch.Tensor
) -> torch.Tensor:
    """``H(w) = sum_x k(x) cos(p · w . x)`` of ``(B, K, K)`` kernels applied on grids of pitch ``(B,)`` (LR pixels),
    at the radii ``(R,)`` times the directions ``(A, 2)``: ``(B, A, R)``. Separable: with ``u = p w_x x`` and
    ``v = p w_y y``, ``cos(u + v) = cos u cos v - sin u sin v``."""
    b, k, _ = kernel.shape
    ax = torch.arange(k, dtype=torch.float64, device=kernel.device) - (k - 1) / 2
    freq = pitch.view(b, 1, 1, 1) * radii.view(1, 1, -1, 1)  # (B, 1, R, 1)
    u = freq * dirs[:, 0].view(1, -1, 1, 1) * ax  # (B, A, R, K): phase along x (columns)
    v = freq * dirs[:, 1].view(1, -1, 1, 1) * ax  # along y (rows)
    kernel = kernel.to(torch.float64)
    # sum_y sum_x k[y, x] f(u_x) g(v_y), as (B, A*R, K) x (B, K, K) products
    a, r = u.shape[1:3]

    def both(f, g) -> torch.Tensor:
        fx = f(u).reshape(b, a * r, k)  # (B, AR, K_x)
        gy = g(v).reshape(b, a * r, k)  # (B, AR, K_y)
        return (torch.bmm(gy, kernel) * fx).sum(-1).view(b, a, r)  # sum_y g(v_y) k[y, x], then sum_x f(u_x)

    return both(torch.cos, torch.cos) - both(torch.sin, torch.sin)


def effective_blur_sigma(
    kernels: list[tuple[torch.Tensor, torch.Tensor]], bottleneck_pitch: torch.Tensor
) -> torch.Tensor:
    """The ``blur_sigma`` of the module docstring for a chain of kernels and a resampling bottleneck.

    Args:
        kernels: ``(kernel (B, K, K), pitch (B,))`` pairs: each kernel and the pitch, in LR pixels, of the grid it is
            applied on.
        bottleneck_pitch: ``(B,)`` the pitch of the coarsest grid, in LR pixels (at least 1).

    Returns:
        ``(B,)`` float32 sigmas in LR pixels, at least :data:`BLUR_SIGMA_MIN`.
    """
    device = bottleneck_pitch.device
    radii, dirs = _frequency_grid(device)
    response = torch.ones(len(bottleneck_pitch), _NUM_ANGLES, _NUM_RADII, dtype=torch.float64, device=device)
    for kernel, pitch in kernels:
        response = response * _kernel_response(kernel.to(device), pitch.to(device, torch.float64), radii, dirs)
    curve = response.mean(1)  # (B, R): averaged over directions
    # the kernels' crossing: the first radius where the curve is <= 1/2, interpolated linearly from the previous one
    # (the curve is 1 at w = 0); pi (the LR Nyquist frequency) when it stays above 1/2
    curve = torch.cat([torch.ones_like(curve[:, :1]), curve], dim=1)
    grid = torch.cat([torch.zeros_like(radii[:1]), radii])
    below = curve <= 0.5
    j = below.to(torch.int64).argmax(1).clamp_min(1)
    c0, c1 = curve.gather(1, (j - 1)[:, None])[:, 0], curve.gather(1, j[:, None])[:, 0]
    frac = ((c0 - 0.5) / (c0 - c1).clamp_min(1e-12)).clamp(0, 1)
    crossing = torch.where(below.any(1), grid[j - 1] + frac * (grid[j] - grid[j - 1]), torch.full_like(c0, math.pi))
    # the ideal low-pass of the bottleneck: 1 below pi / p_max, 0 above
    w_half = torch.minimum(crossing, math.pi / bottleneck_pitch.to(torch.float64).clamp_min(1.0))
    return (math.sqrt(2 * math.log(2)) / w_half).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# The recording degradation
# ----------------------------------------------------------------------------------------------------------------------


class _RecordingRealESRGAN(RealESRGANDegradation):
    """:class:`RealESRGANDegradation` that records, while :meth:`apply` runs unchanged, the batch-wide resize draws
    (stage 1, stage 2, and the final interpolation mode, drawn right after them) and which noise stages ran."""

    def __init__(self, config):
        super().__init__(config)
        self.resizes: list[tuple[float, str]] = []
        self.final_mode: str | None = None
        self.noise_stages: list[int] = []
        self.state_after_noise: torch.Tensor | None = None

    def _draw_resize(self, generator, probs, scale_range):
        factor, mode = RealESRGANDegradation._draw_resize(generator, probs, scale_range)
        self.resizes.append((factor, mode))
        if len(self.resizes) == 2:  # apply draws the final mode next: read it from a copy of the generator
            peek = torch.Generator(device=generator.device)
            peek.set_state(generator.get_state())
            index = int(torch.randint(0, len(INTERPOLATION_MODES), (), generator=peek, device=generator.device))
            self.final_mode = INTERPOLATION_MODES[index]
        return factor, mode

    def _noise(self, img, params, stage, generator):
        self.noise_stages.append(stage)
        noisy = super()._noise(img, params, stage, generator)
        self.state_after_noise = generator.get_state()
        return noisy


class _NoiselessReplay(_RecordingRealESRGAN):
    """:class:`_RecordingRealESRGAN` whose noise stages draw their noise but do not add it. Every other draw is the
    recorded run's: stage 1 sees the same image in both runs (its draws match even where their number depends on the
    values, as Poisson sampling's may), and stage 2's noise is the chain's last draw (checked by the recorded run)."""

    def _noise(self, img, params, stage, generator):
        super()._noise(img, params, stage, generator)
        return img


@dataclass
class _Draws:
    """What one :meth:`RealESRGANDegradation.apply` call drew, as read by :class:`_RecordingRealESRGAN`."""

    resizes: list[tuple[float, str]]
    final_mode: str
    apply_state: torch.Tensor  # the generator's state when apply started: replaying from it repeats every draw


def _run_recorded(
    degradation: RealESRGANDegradation, hr: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor], _Draws]:
    recorder = _RecordingRealESRGAN(degradation.config)
    params = recorder.sample_batch(hr.shape[0], generator)
    apply_state = generator.get_state()
    lr = recorder.apply(hr, params, generator)
    after_noise = recorder.state_after_noise
    last_draw = after_noise is not None and torch.equal(after_noise, generator.get_state())
    if len(recorder.resizes) != 2 or recorder.final_mode is None or recorder.noise_stages != [1, 2] or not last_draw:
        raise RuntimeError(
            "RealESRGANDegradation.apply no longer draws two resizes and adds noise twice, the second noise being its "
            "last draw, as the degradation estimator's targets expect; update sr_diffusion/estimation/targets.py"
        )
    return lr, params, _Draws(recorder.resizes, recorder.final_mode, apply_state)


def _replay_without_noise(
    degradation: RealESRGANDegradation, hr: torch.Tensor, params: dict[str, torch.Tensor], draws: _Draws, device
) -> torch.Tensor:
    """The LR images of the recorded run with its noise left out (every other draw the same)."""
    generator = torch.Generator(device=device)
    generator.set_state(draws.apply_state)
    return _NoiselessReplay(degradation.config).apply(hr, params, generator)


# ----------------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------------


def degrade_with_targets(
    degradation: RealESRGANDegradation, hr: torch.Tensor, generator: torch.Generator, return_params: bool = False
):
    """Degrade ``hr`` with ``degradation`` (its :meth:`~RealESRGANDegradation.sample_batch` then
    :meth:`~RealESRGANDegradation.apply`, one generator) and return the LR images with their targets.

    Args:
        degradation: a :class:`~sr_diffusion.degradations.RealESRGANDegradation` (any config).
        hr: ``(B, 3, H, W)`` float in [0, 1].
        generator: the only source of randomness; the LR images are exactly ``degradation.degrade(hr, generator)``'s.
        return_params: also return the parameters the degradation sampled (its ``sample_batch`` dict).

    Returns:
        ``(lr, targets)``: ``lr`` ``(B, 3, H / s, W / s)`` on the 8-bit grid, and a
        :class:`~sr_diffusion.estimation.DegradationEstimate` of ``(B,)`` float32 tensors on ``hr``'s device (module
        docstring); ``(lr, targets, params)`` with ``return_params``.
    """
    from .model import DegradationEstimate

    if not isinstance(degradation, RealESRGANDegradation):
        raise TypeError(
            "the degradation estimator's targets are defined for the Real-ESRGAN second-order degradation; got "
            f"{type(degradation).__name__}"
        )
    lr, params, draws = _run_recorded(degradation, hr, generator)
    s = degradation.scale
    h, w = hr.shape[-2:]
    (f1, _), (f2, _) = draws.resizes
    size1 = (max(1, int(h * f1)), max(1, int(w * f1)))
    size2 = (max(1, int(h / s * f2)), max(1, int(w / s * f2)))
    lr_size = lr.shape[-2:]
    b, device = hr.shape[0], hr.device

    # blur: pitches in LR pixels (geometric mean of the two axes)
    def pitch(size) -> float:
        return math.sqrt((lr_size[0] / size[0]) * (lr_size[1] / size[1]))

    def full(value: float) -> torch.Tensor:
        return torch.full((b,), value, dtype=torch.float64, device=device)

    p1, p2 = pitch(size1), pitch(size2)
    blur = effective_blur_sigma(
        [(params["kernel1"], full(1.0 / s)), (params["kernel2"], full(p1)), (params["sinc_kernel"], full(1.0))],
        full(max(p1, p2, 1.0)),
    )

    # noise: what the LR image shows of it, against the same run without it
    noiseless = _replay_without_noise(degradation, hr, params, draws, generator.device)
    noise_sigma = 255.0 * (lr - noiseless.to(lr.device)).float().square().mean(dim=(1, 2, 3)).sqrt().to(device)

    # JPEG: the final compression's quality where its blocks stay on the LR grid, else 100
    quality = params["jpeg_quality2"].to(device=device, dtype=torch.float32)
    on_lr_grid = ~params["jpeg_first"].to(device).bool() | (tuple(size2) == tuple(lr_size))
    visible = params["jpeg2"].to(device).bool() & on_lr_grid
    quality = torch.where(visible, quality, torch.full_like(quality, 100.0))
    targets = DegradationEstimate(blur_sigma=blur.to(device), noise_sigma=noise_sigma, jpeg_quality=quality)
    return (lr, targets, params) if return_params else (lr, targets)
