"""The held-out HR crops shipped in tests/data/heldout (CREDITS.md) as a held-out set for tests."""

from __future__ import annotations

from pathlib import Path

from sr_diffusion.heldout import HeldoutImage, bicubic_lr
from sr_diffusion.image_processor import SRImageProcessor, load_image

HELDOUT_DIR = Path(__file__).parent / "data" / "heldout"
# (top, left) of each crop in its x2-downscaled photo, as CREDITS.md
CROP_BOXES = {
    "life_by_Aitzol_Berasategi": (816, 1216),
    "picosdeeuropa_by_Aitzol_Berasategi": (176, 768),
    "seeding_by_Clements_Engelhardt": (560, 1072),
}


def heldout_crops() -> list[HeldoutImage]:
    """The three 192x192 crops (sorted by name) with their x4 MATLAB-bicubic LR on the 8-bit grid, as
    :func:`sr_diffusion.heldout.corpus_images` prepares a corpus photo."""
    images = []
    for path in sorted(HELDOUT_DIR.glob("*.png")):
        hr = SRImageProcessor().preprocess(load_image(path)).rgb
        images.append(HeldoutImage(path.stem, hr, bicubic_lr(hr), (*CROP_BOXES[path.stem], *hr.shape[-2:])))
    return images
