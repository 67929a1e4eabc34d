"""Real JPEG compression artefacts (Real-ESRGAN, Wang et al., 2021, Sec. 3.1 "JPEG compression").

Real-ESRGAN simulates JPEG with a differentiable re-implementation on the GPU; we encode and decode with the
actual codec (Pillow / libjpeg, 4:2:0 chroma subsampling as libjpeg's default), one image at a time on the CPU,
and move the result back to the input's device. libjpeg takes integer qualities, so qualities are integers.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ._rng import check_generator
from .ops import quantize_8bit

__all__ = ["jpeg_compress", "random_jpeg_compress", "sample_jpeg_quality"]


def _encode_decode(array: np.ndarray, quality: int) -> np.ndarray:
    """``(H, W, C)`` uint8 -> JPEG bytes at ``quality`` -> ``(H, W, C)`` uint8."""
    mode = "L" if array.shape[2] == 1 else "RGB"
    image = Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality), subsampling="4:2:0")
    buffer.seek(0)
    decoded = np.asarray(Image.open(buffer).convert(mode))
    return decoded[..., None] if mode == "L" else decoded


def jpeg_compress(img: torch.Tensor, quality: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """JPEG-encode and decode every image at its quality.

    Args:
        img: ``(B, C, H, W)`` float, RGB (``C = 3``) or grey (``C = 1``); values are clamped to [0, 1] and
            rounded to 8 bits before encoding.
        quality: one integer in [1, 100] for the whole batch, or ``B`` of them.

    Returns:
        ``(B, C, H, W)`` on ``img``'s device and dtype, on the 8-bit grid.
    """
    b, c = img.shape[:2]
    if c not in (1, 3):
        raise ValueError(f"JPEG needs 1 or 3 channels, got {c}")
    qualities = torch.as_tensor(quality).flatten().tolist()
    if len(qualities) == 1:
        qualities = qualities * b
    if len(qualities) != b:
        raise ValueError(f"expected 1 or {b} qualities, got {len(qualities)}")
    for q in qualities:
        if not 1 <= q <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {q}")
    arrays = (quantize_8bit(img.detach()) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([_encode_decode(a, q) for a, q in zip(arrays, qualities)])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(device=img.device, dtype=img.dtype) / 255.0


def sample_jpeg_quality(batch: int, quality_range: Sequence[float], *, generator: torch.Generator) -> torch.Tensor:
    """``(B,)`` int64 qualities drawn uniformly from the integers in ``[low, high]`` (both included)."""
    check_generator(generator)
    low, high = int(np.ceil(quality_range[0])), int(np.floor(quality_range[1]))
    if low > high:
        raise ValueError(f"quality_range {tuple(quality_range)} contains no integer")
    q = torch.randint(low, high + 1, (batch,), generator=generator, device=generator.device)
    return q.cpu()


def random_jpeg_compress(
    img: torch.Tensor, quality_range: Sequence[float] = (90, 100), *, generator: torch.Generator
) -> torch.Tensor:
    """:func:`jpeg_compress` with a per-image quality from :func:`sample_jpeg_quality`."""
    return jpeg_compress(img, sample_jpeg_quality(img.shape[0], quality_range, generator=generator))
