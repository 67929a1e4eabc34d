"""Side-by-side comparison images."""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import PIL.ImageDraw

__all__ = ["comparison_grid"]


def comparison_grid(
    lr: PIL.Image.Image,
    sr: PIL.Image.Image,
    extra: Sequence[tuple[str, PIL.Image.Image]] = (),
    label_height: int = 18,
    sr_label: str = "sr_diffusion",
) -> PIL.Image.Image:
    """LR (nearest and bicubic upsampled to the SR size) next to the SR output (labelled ``sr_label``) and any
    ``extra`` panels.

    Each panel has a text label above it. All panels are shown at the SR output's size.
    """
    size = sr.size
    lr_rgb = lr.convert("RGB")
    panels = [
        ("input (nearest)", lr_rgb.resize(size, PIL.Image.Resampling.NEAREST)),
        ("bicubic", lr_rgb.resize(size, PIL.Image.Resampling.BICUBIC)),
        (sr_label, sr.convert("RGB")),
    ]
    panels += [(name, img.convert("RGB").resize(size, PIL.Image.Resampling.BICUBIC)) for name, img in extra]
    gap = 4
    width = len(panels) * size[0] + (len(panels) - 1) * gap
    grid = PIL.Image.new("RGB", (width, size[1] + label_height), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for i, (name, img) in enumerate(panels):
        x = i * (size[0] + gap)
        grid.paste(img, (x, label_height))
        draw.text((x + 4, 3), name, fill="black")
    return grid
