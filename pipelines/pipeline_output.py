"""Output dataclass shared by every sr_diffusion pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

__all__ = ["SRPipelineOutput"]


@dataclass
class SRPipelineOutput(BaseOutput):
    """Upscaled images.

    Attributes:
        images: a list of PIL images, a (N, H, W, C) numpy array or an (N, C, H, W) tensor in [0, 1],
            following ``output_type``. C is 4 (RGBA) when the input had an alpha channel.
    """

    images: Union[list[PIL.Image.Image], np.ndarray, torch.Tensor]
