"""Synthetic training images: the dead-leaves model.

A dead-leaves image (Matheron 1968; Lee, Mumford & Huang, "Occlusion models for natural images", IJCV 2001)
is a stack of opaque disks dropped on the plane, seen from above: each pixel shows the first disk that
covers it. With radii drawn from a power law ``p(r) ∝ r^-α`` on ``[r_min, r_max]`` and ``α ≈ 3`` the
image is statistically scale invariant, with the edge, occlusion and power-spectrum statistics of natural
photos; Achddou, Gousseau & Ladjal ("Synthetic images as a regularity prior for image restoration
neural networks", SSVM 2021) train restoration networks on it that come close to ones trained on
photos. Here it tops up the few photos bundled with scikit-image and scikit-learn (``data.synthetic``).

Rendering (:meth:`DeadLeaves.render`): disks are drawn front to back in chunks until every pixel of a
``size·supersample`` canvas is covered; for every pixel the index of the first covering disk is a
``scatter_reduce(amin)`` over (disk, stencil offset) pairs, the disks grouped by radius so that each group
uses a stencil just large enough. Colours are drawn from a palette (by default pixels of the training
photos, so the colour statistics are those of real images), optionally with a linear shading ramp
across each leaf (its brightness). The canvas is area-averaged by ``supersample`` (anti-aliased edges, as a camera's
pixels integrate light), optionally blurred by a Gaussian of random width (defocus), and rounded to
8 bits. Every random draw comes from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DeadLeaves", "photo_palette"]

# Pairs (disk, stencil offset) per scatter call: bounds the memory of one call to a few tens of MB.
_MAX_PAIRS = 1 << 22
# Disks with stencil half-width up to 2**_STENCIL_LEVELS are rasterised in groups, larger ones one by one.
_STENCIL_LEVELS = 3


def photo_palette(images: Sequence[torch.Tensor], size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` colours (size, 3) in [0, 1]: pixels drawn uniformly from uniformly chosen ``images``
    ((3, H, W), uint8 or float in [0, 1])."""
    if not images:
        raise ValueError("a photo palette needs at least one image")
    which = torch.randint(0, len(images), (size,), generator=generator)
    colours = torch.empty(size, 3)
    for i, img in enumerate(images):
        rows = (which == i).nonzero().flatten()
        if rows.numel() == 0:
            continue
        img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        flat = img.reshape(img.shape[0], -1)
        picks = torch.randint(0, flat.shape[1], (rows.numel(),), generator=generator)
        colours[rows] = flat[:, picks].T[:, :3] if flat.shape[0] >= 3 else flat[:, picks].T.expand(-1, 3)
    return colours


@dataclass
class DeadLeaves:
    """The dead-leaves model with power-law radii.

    Args:
        r_min, r_max: leaf radius range in output pixels (``r_max=None``: the image side).
        alpha: exponent of the radius density ``p(r) ∝ r^-alpha`` (3 is scale invariant).
        supersample: the canvas is rendered this many times larger and area-averaged down.
        shading: largest change of a leaf's brightness across its radius (a linear ramp added to all
            three channels, in a random direction, amplitude drawn uniformly in ``[0, shading]``); 0 gives
            flat leaves.
        blur_sigma: ``(lo, hi)``: each image is blurred by a Gaussian of sigma ~ U[lo, hi] output pixels
            (0 = no blur), a defocus / optics model.
        palette: (P, 3) colours in [0, 1] the leaves are drawn from (:func:`photo_palette`); None draws
            colours uniformly in the RGB cube.
        max_chunks: chunks of disks to draw before leaving the last uncovered pixels (if any) to a
            background leaf of its own colour.
    """

    r_min: float = 1.0
    r_max: float | None = None
    alpha: float = 3.0
    supersample: int = 2
    shading: float = 0.0
    blur_sigma: tuple[float, float] = (0.0, 0.0)
    palette: torch.Tensor | None = None
    max_chunks: int = 16

    def __post_init__(self):
        if not self.r_min > 0:
            raise ValueError(f"r_min must be > 0, got {self.r_min}")
        if self.r_max is not None and self.r_max < self.r_min:
            raise ValueError(f"r_max={self.r_max} must be >= r_min={self.r_min}")
        if self.alpha <= 0 or self.alpha == 1:
            raise ValueError(f"alpha must be > 0 and != 1, got {self.alpha}")
        if int(self.supersample) < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")
        lo, hi = (float(s) for s in self.blur_sigma)
        if not 0 <= lo <= hi:
            raise ValueError(f"blur_sigma must be (lo, hi) with 0 <= lo <= hi, got {list(self.blur_sigma)}")
        self.blur_sigma = (lo, hi)
        if not 0 <= self.shading <= 1:
            raise ValueError(f"shading must be in [0, 1], got {self.shading}")
        if self.palette is not None:
            palette = torch.as_tensor(self.palette, dtype=torch.float32)
            if palette.ndim != 2 or palette.shape[1] != 3 or palette.shape[0] == 0:
                raise ValueError(f"palette must be (P, 3), got {tuple(palette.shape)}")
            self.palette = palette

    # ------------------------------------------------------------------------------------------------------

    def sample_radii(self, n: int, r_max: float, generator: torch.Generator) -> torch.Tensor:
        """``n`` radii from ``p(r) ∝ r^-alpha`` on ``[r_min, r_max]`` by inverting the CDF (float64)."""
        a = 1.0 - self.alpha
        lo, hi = self.r_min**a, r_max**a
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (lo + u * (hi - lo)) ** (1.0 / a)

    def _colours(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.palette is None:
            return torch.rand(n, 3, generator=generator)
        return self.palette[torch.randint(0, self.palette.shape[0], (n,), generator=generator)]

    def render(self, size: int | tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """A dead-leaves image, float32 (3, H, W) in [0, 1], 8-bit values; ``size`` = side or (H, W)."""
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if h < 1 or w < 1:
            raise ValueError(f"size must be positive, got {size}")
        s = int(self.supersample)
        H, W = h * s, w * s
        r_max = max(self.r_min, float(max(h, w) if self.r_max is None else self.r_max))
        mean_area = self._mean_area(r_max) * s * s
        # Chunks of disks with an expected coverage of 4 each; in every chunk after the first only the
        # disks whose bounding box holds an uncovered pixel are rasterised.
        n = max(16, math.ceil(4.0 * H * W / mean_area))
        owner = torch.full((H * W,), -1, dtype=torch.long)
        centres, radii = [], []
        drawn = 0
        for _ in range(self.max_chunks):
            r = self.sample_radii(n, r_max, generator) * s
            # Centres uniform over the canvas dilated by each radius: every disk can reach the canvas.
            u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
            cy = -r + u[:, 0] * (H + 2 * r)
            cx = -r + u[:, 1] * (W + 2 * r)
            hole = owner < 0
            useful = _touches(hole.view(H, W), cy, cx, r) if drawn else torch.arange(n)
            first = _first_cover(cy[useful], cx[useful], r[useful], H, W)
            fill = hole & (first >= 0)
            owner[fill] = useful[first[fill]] + drawn
            centres.append(torch.stack([cy, cx], 1))
            radii.append(r)
            drawn += n
            if not bool((owner < 0).any()):
                break
        centres_all, radii_all = torch.cat(centres), torch.cat(radii)
        # One more leaf underneath everything: it shows wherever no disk landed.
        background = drawn
        owner[owner < 0] = background
        n = drawn + 1
        colours = self._colours(n, generator)
        image = colours[owner]  # (H·W, 3)
        if self.shading > 0:
            amplitude = torch.rand(n, generator=generator) * self.shading
            angle = torch.rand(n, generator=generator) * (2 * math.pi)
            direction = torch.stack([angle.sin(), angle.cos()], 1) * amplitude[:, None]
            centres_all = torch.cat([centres_all, torch.tensor([[H / 2, W / 2]], dtype=torch.float64)])
            radii_all = torch.cat([radii_all, torch.tensor([max(H, W) / 2], dtype=torch.float64)])
            ys, xs = torch.meshgrid(
                torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij"
            )
            offset = torch.stack([ys.flatten(), xs.flatten()], 1) - centres_all[owner]
            ramp = (offset / radii_all[owner][:, None]).float()
            image = image + (ramp * direction[owner]).sum(1, keepdim=True)
        image = image.T.reshape(3, H, W)
        if s > 1:
            image = F.avg_pool2d(image[None], s)[0]
        lo, hi = self.blur_sigma
        if hi > 0:
            sigma = lo + (hi - lo) * float(torch.rand((), generator=generator))
            image = _gaussian_blur(image, sigma)
        return (image.clamp(0, 1) * 255.0).round() / 255.0

    def _mean_area(self, r_max: float) -> float:
        """E[π r²] of the radius law, in output pixels²."""
        a = self.alpha
        lo, hi = self.r_min, r_max
        if hi == lo:
            return math.pi * lo * lo
        norm = (hi ** (1 - a) - lo ** (1 - a)) / (1 - a)
        second = math.log(hi / lo) if a == 3 else (hi ** (3 - a) - lo ** (3 - a)) / (3 - a)
        return math.pi * second / norm


def _first_cover(cy: torch.Tensor, cx: torch.Tensor, r: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """For every pixel of an (H, W) canvas (flattened), the smallest index ``i`` with pixel centre inside
    disk ``i`` (centre ``(cy_i, cx_i)``, radius ``r_i``, pixel units, pixel ``(y, x)`` centred at
    ``(y, x)``), or -1. Small disks are grouped by stencil half-width ``2^k`` and scattered in bounded
    chunks; each large one (few, but with stencils mostly off the canvas) is drawn in its clipped box."""
    none = torch.iinfo(torch.long).max
    owner = torch.full((H * W,), none, dtype=torch.long)
    half = torch.ceil(r).clamp(min=1)
    level = torch.ceil(torch.log2(half)).long()
    large = (level > _STENCIL_LEVELS).nonzero().flatten().tolist()
    for k in level.unique().tolist():
        if k > _STENCIL_LEVELS:
            continue
        index = (level == k).nonzero().flatten()
        reach = 2**k
        span = torch.arange(-reach, reach + 1, dtype=torch.float32)
        oy, ox = (t.flatten() for t in torch.meshgrid(span, span, indexing="ij"))
        oy_long, ox_long = oy.long(), ox.long()
        per_chunk = max(1, _MAX_PAIRS // oy.numel())
        for start in range(0, index.numel(), per_chunk):
            idx = index[start : start + per_chunk]
            iy, ix = torch.round(cy[idx]), torch.round(cx[idx])
            # Offsets from the disk centre: the sub-pixel part in float64, then float32 for speed.
            dy = (iy - cy[idx]).float()[:, None] + oy
            dx = (ix - cx[idx]).float()[:, None] + ox
            rows, cols = (dy * dy + dx * dx <= (r[idx] * r[idx]).float()[:, None]).nonzero(as_tuple=True)
            py = iy.long()[rows] + oy_long[cols]
            px = ix.long()[rows] + ox_long[cols]
            keep = (py >= 0) & (py < H) & (px >= 0) & (px < W)
            flat = (py * W + px)[keep]
            values = idx[rows][keep]
            owner.scatter_reduce_(0, flat, values, reduce="amin")
    grid = owner.view(H, W)
    for i in large:
        top, bottom = max(0, math.ceil(cy[i] - r[i])), min(H, math.floor(cy[i] + r[i]) + 1)
        left, right = max(0, math.ceil(cx[i] - r[i])), min(W, math.floor(cx[i] + r[i]) + 1)
        if top >= bottom or left >= right:
            continue
        ys = torch.arange(top, bottom, dtype=torch.float64)[:, None] - cy[i]
        xs = torch.arange(left, right, dtype=torch.float64)[None, :] - cx[i]
        region = grid[top:bottom, left:right]
        region[(ys * ys + xs * xs <= r[i] * r[i]) & (region > i)] = i
    owner[owner == none] = -1
    return owner


def _touches(mask: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Indices of the disks whose bounding box holds a True pixel of ``mask`` (H, W) (summed-area table)."""
    H, W = mask.shape
    table = F.pad(mask.long().cumsum(0).cumsum(1), (1, 0, 1, 0))
    top = torch.ceil(cy - r).clamp(0, H).long()
    bottom = (torch.floor(cy + r) + 1).clamp(0, H).long()
    left = torch.ceil(cx - r).clamp(0, W).long()
    right = (torch.floor(cx + r) + 1).clamp(0, W).long()
    count = table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]
    return (count > 0).nonzero().flatten()


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Isotropic Gaussian blur of (C, H, W) (reflect padding, kernel side ``2·ceil(3 sigma) + 1``)."""
    if sigma <= 0:
        return image
    from sr_diffusion.degradations.kernels import bivariate_gaussian
    from sr_diffusion.degradations.ops import filter2d

    kernel = bivariate_gaussian(2 * math.ceil(3 * sigma) + 1, sigma)
    return filter2d(image[None], kernel)[0]
