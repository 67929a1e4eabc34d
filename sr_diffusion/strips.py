"""Upscale a large image in horizontal strips, so that its memory is the 8-bit output plus one strip's work.

Tiling (:mod:`sr_diffusion.tiling`) bounds a model's activations, but a tiled upscale still holds float32 buffers of
the whole output (the blended sum, its weights, the conversion to 8 bits): about 50-120 bytes per output pixel, 10-23
GB for a 12-megapixel photo at x4. In strips, only one strip's output is ever in float::

    LR rows   [y_k, y_k + t)            y_k = k · (t − o),   the last strip ends at H (and is longer than o)
    output    [s·y_k, s·(y_k + t))      upscale(strip_k), float in [0, 1]
    overlap   [s·y_{k+1}, s·(y_k + t))  blended linearly: w_{k+1} = (i + ½) / (s·o) down the s·o rows, w_k = 1 − w_{k+1}

Rows above the next strip's overlap are final once strip ``k`` is done: they are rounded to 8 bits (as the pipelines'
``output_type="pil"``, ``round(255 · x)``) and pasted into the output image; the overlap is carried to the next strip.
A strip is any image to the pipeline, which pads and tiles it as it would a whole image; for a sampling pipeline
every strip draws its noise from the same generator, in order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image

__all__ = ["strip_rows", "upscale_in_strips"]


def strip_rows(height: int, strip: int, overlap: int) -> list[tuple[int, int]]:
    """The ``(top, bottom)`` LR rows of each strip: ``strip`` rows every ``strip − overlap`` rows, the last one cut
    at ``height``. Neighbours share ``overlap`` rows; no row is in three strips (``2 · overlap ≤ strip``)."""
    if not 0 <= 2 * overlap <= strip:
        raise ValueError(f"strip overlap must be in [0, strip / 2], got overlap {overlap} for strip {strip}")
    rows, top = [], 0
    while True:
        rows.append((top, min(top + strip, height)))
        if top + strip >= height:
            return rows
        top += strip - overlap


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def upscale_in_strips(
    upscale: Callable[[PIL.Image.Image], np.ndarray],
    image: PIL.Image.Image,
    *,
    scale: int,
    strip: int,
    overlap: int,
    progress: Callable[[int, int], None] | None = None,
) -> PIL.Image.Image:
    """Upscale ``image`` strip by strip (see the module) into an RGB or RGBA image ``scale`` times its size.

    Args:
        upscale: maps a strip (a PIL image ``W × h``) to its upscaled ``(h·scale, W·scale, C)`` float array in
            [0, 1], ``C`` 3 or 4 (a pipeline with ``output_type="np"``, first image).
        image: the LR image.
        scale: the output/input size ratio.
        strip: LR rows per strip.
        overlap: LR rows shared by neighbouring strips (blended linearly).
        progress: called with ``(strips done, strips)`` after each strip.
    """
    width, height = image.size
    rows = strip_rows(height, strip, overlap)
    output: PIL.Image.Image | None = None
    carry: np.ndarray | None = None  # the previous strip's float rows in this strip's overlap
    for k, (top, bottom) in enumerate(rows):
        out = np.asarray(upscale(image.crop((0, top, width, bottom))), dtype=np.float32)
        expected = ((bottom - top) * scale, width * scale)
        if out.ndim != 3 or out.shape[:2] != expected or out.shape[2] not in (3, 4):
            raise ValueError(f"strip {k}: upscaled to {out.shape}, expected {expected} x 3 or 4 channels")
        if output is None:
            mode = "RGB" if out.shape[2] == 3 else "RGBA"
            output = PIL.Image.new(mode, (width * scale, height * scale))
        if carry is not None:  # blend the overlap with the previous strip's rows
            n = carry.shape[0]
            ramp = ((np.arange(n, dtype=np.float32) + 0.5) / n)[:, None, None]
            out[:n] = carry * (1.0 - ramp) + out[:n] * ramp
        final = (rows[k + 1][0] - top) * scale if k + 1 < len(rows) else out.shape[0]
        output.paste(PIL.Image.fromarray(_to_uint8(out[:final]), mode=output.mode), (0, top * scale))
        carry = out[final:].copy() if k + 1 < len(rows) else None
        del out
        if progress is not None:
            progress(k + 1, len(rows))
    return output
