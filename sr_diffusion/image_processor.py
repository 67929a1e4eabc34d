"""Image conversions at the package boundary: PIL / numpy / torch in, NCHW float tensors out, and back.

Conventions (../shared/STYLE.md): images are NCHW float tensors in [0, 1] at the boundaries and
[-1, 1] inside diffusion models. Alpha channels are split off and returned separately so that a
pipeline can upscale them on their own and put them back; nothing is resized or dropped silently.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

__all__ = [
    "ImageInput",
    "ImageLoadError",
    "MAX_IMAGE_PIXELS",
    "PreprocessedImage",
    "SRImageProcessor",
    "load_image",
    "pad_to_multiple",
    "crop_to_size",
    "save_image",
]

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike]

# PIL integer modes whose pixel values are not 8-bit.
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class ImageLoadError(ValueError):
    """An input file is missing, empty, not an image, truncated, or over the pixel limit."""


#: The most pixels (width x height) :func:`load_image` decodes by default: 100 megapixels, 1.2 GB as float32 RGB.
#: Checked from the file's header, before decoding, so a decompression bomb (a tiny file whose header claims a huge
#: image) costs nothing. The environment variable ``SR_DIFFUSION_MAX_PIXELS`` or ``load_image(max_pixels=...)`` (the
#: CLI's ``--max-pixels``) raise it. PIL's own, process-wide ``PIL.Image.MAX_IMAGE_PIXELS`` is not used.
MAX_IMAGE_PIXELS = 100_000_000

_PIL_LIMIT_LOCK = threading.Lock()


def _max_pixels(max_pixels: int | None) -> int:
    if max_pixels is not None:
        return max_pixels
    env = os.environ.get("SR_DIFFUSION_MAX_PIXELS")
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise ImageLoadError(f"SR_DIFFUSION_MAX_PIXELS={env!r} is not a number of pixels") from None
    return MAX_IMAGE_PIXELS


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> PIL.Image.Image:
    """Open an image file fully (decoding every pixel now) and apply its EXIF orientation.

    ``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`, or ``SR_DIFFUSION_MAX_PIXELS``) bounds width x height; the size
    is read from the header and checked before any pixel is decoded.

    Raises :class:`ImageLoadError` naming the file for a missing, empty, non-image, corrupt or truncated file, and
    for an image over the pixel limit (the message says how to raise it).
    """
    path = Path(path)
    limit = _max_pixels(max_pixels)
    if not path.is_file():
        raise ImageLoadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"{path}: file is empty (0 bytes)")
    try:
        with _PIL_LIMIT_LOCK:  # our limit replaces PIL's process-wide one, only while the header is read
            pil_limit, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, None
            try:
                img = PIL.Image.open(path)
            finally:
                PIL.Image.MAX_IMAGE_PIXELS = pil_limit
    except PIL.UnidentifiedImageError as err:
        raise ImageLoadError(f"{path}: not an image file PIL can read") from err
    except Exception as err:  # a corrupt header can raise anything from inside a PIL plugin
        raise ImageLoadError(f"{path}: corrupt image header ({type(err).__name__}: {err})") from err
    with img:
        width, height = img.size
        if width * height > limit:
            raise ImageLoadError(
                f"{path}: image is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
                f"{limit / 1e6:g}-megapixel limit (a decompression bomb?); if it is genuine, raise the limit with "
                "--max-pixels, SR_DIFFUSION_MAX_PIXELS or load_image(max_pixels=...)"
            )
        try:
            img.load()  # decode now so truncated files fail here, not later
            img = PIL.ImageOps.exif_transpose(img)
            img.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageLoadError(f"{path}: corrupt or truncated image ({err})") from err
        except Exception as err:  # PIL's decoders raise other types on some corrupt files
            raise ImageLoadError(f"{path}: corrupt image ({type(err).__name__}: {err})") from err
    return img


def _pil_to_arrays(img: PIL.Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Convert any PIL mode to (rgb float32 HxWx3 in [0,1], alpha float32 HxW in [0,1] or None).

    16-bit grayscale ("I;16", "I") keeps its full precision. Pillow itself decodes 16-bit RGB PNGs to
    8-bit "RGB", so those arrive here at 8-bit precision.
    """
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float32)
        # "I" holds 32-bit ints; 16-bit PNGs decode to it with values in [0, 65535].
        max_value = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(arr / max_value, 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=2), None
    if mode == "F":
        gray = np.asarray(img).astype(np.float32)
        if not np.isfinite(gray).all():
            raise ValueError("image contains NaN or infinite values")
        if gray.min(initial=0) < 0 or gray.max(initial=0) > 1:
            raise ValueError("a float ('F' mode) image must have values in [0, 1]")
        return np.repeat(gray[..., None], 3, axis=2), None
    if mode in ("LA", "RGBA", "PA"):
        rgba = np.asarray(img.convert("RGBA")).astype(np.float32) / 255.0
        return rgba[..., :3], rgba[..., 3]
    if mode == "CMYK":
        return np.asarray(img.convert("RGB")).astype(np.float32) / 255.0, None
    rgb = np.asarray(img.convert("RGB")).astype(np.float32) / 255.0
    return rgb, None


def _array_to_arrays(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """numpy HxW, HxWx1, HxWx3 or HxWx4 (uint8, uint16 or float in [0,1]) → (rgb, alpha)."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"numpy images must be HxW or HxWxC with C in 1..4, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        _check_float_range(torch.from_numpy(arr))
    else:
        raise ValueError(f"unsupported numpy image dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    channels = arr.shape[2]
    alpha = None
    if channels in (2, 4):
        alpha = arr[..., -1]
        arr = arr[..., :-1]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr, alpha


def _check_float_range(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError("image contains NaN or infinite values")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"float images must have values in [0, 1], got [{x.min().item():.4g}, {x.max().item():.4g}]")


@dataclass
class PreprocessedImage:
    """A batch ready for a model.

    Attributes:
        rgb: (N, 3, H, W) float32 in [0, 1].
        alpha: (N, 1, H, W) float32 in [0, 1], or None when no input had an alpha channel.
    """

    rgb: torch.Tensor
    alpha: torch.Tensor | None


class SRImageProcessor:
    """Converts user images to model tensors and model outputs back to images.

    Accepted inputs: a PIL image of any common mode (1, L, LA, P, RGB, RGBA, CMYK, I;16, I, F),
    a file path, a numpy array (HxW[xC], uint8 / uint16 / float in [0,1]), a torch tensor
    ((C,H,W) or (N,C,H,W) float in [0,1], C in 1..4), or a list of those with equal sizes.
    Alpha (LA, RGBA, P with transparency, 2 or 4 channels) is returned separately, never dropped.
    """

    def preprocess(self, image: ImageInput | Sequence[ImageInput]) -> PreprocessedImage:
        if isinstance(image, torch.Tensor):
            return self._preprocess_tensor(image)
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError("no image given: the image list is empty")
        rgbs, alphas = [], []
        for item in images:
            if isinstance(item, torch.Tensor):
                pre = self._preprocess_tensor(item)
                rgbs.append(pre.rgb)
                alphas.append(pre.alpha)
                continue
            if isinstance(item, (str, os.PathLike)):
                item = load_image(item)
            if isinstance(item, PIL.Image.Image):
                rgb, alpha = _pil_to_arrays(item)
            elif isinstance(item, np.ndarray):
                rgb, alpha = _array_to_arrays(item)
            else:
                raise TypeError(
                    f"unsupported image type {type(item).__name__}; expected a PIL image, path, numpy array "
                    "or torch tensor"
                )
            rgbs.append(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None])
            alphas.append(None if alpha is None else torch.from_numpy(np.ascontiguousarray(alpha))[None, None])
        sizes = {tuple(t.shape[-2:]) for t in rgbs}
        if len(sizes) > 1:
            raise ValueError(f"all images in a batch must have the same size, got {sorted(sizes)}")
        rgb = torch.cat(rgbs)
        if all(a is None for a in alphas):
            return PreprocessedImage(rgb, None)
        # Images without alpha in a mixed batch are fully opaque.
        alpha = torch.cat([torch.ones_like(r[:, :1]) if a is None else a for r, a in zip(rgbs, alphas)])
        return PreprocessedImage(rgb, alpha)

    def _preprocess_tensor(self, x: torch.Tensor) -> PreprocessedImage:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] not in (1, 2, 3, 4):
            raise ValueError(f"tensor images must be (C,H,W) or (N,C,H,W) with C in 1..4, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"tensor images must be floating point in [0, 1], got dtype {x.dtype}")
        x = x.float()
        _check_float_range(x)
        alpha = None
        if x.shape[1] in (2, 4):
            alpha, x = x[:, -1:], x[:, :-1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return PreprocessedImage(x.contiguous(), alpha)

    def postprocess(self, rgb: torch.Tensor, alpha: torch.Tensor | None = None, output_type: str = "pil"):
        """(N,3,H,W) [0,1] (+ optional (N,1,H,W) alpha) → list of PIL images, (N,H,W,C) numpy, or NCHW tensor.

        Values are clamped to [0, 1]. With alpha, PIL images are RGBA and arrays/tensors have 4 channels.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        out = rgb.float().clamp(0, 1)
        if alpha is not None:
            out = torch.cat([out, alpha.float().clamp(0, 1).to(out.device)], dim=1)
        if output_type == "pt":
            return out
        array = out.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        mode = "RGBA" if alpha is not None else "RGB"
        return [PIL.Image.fromarray((a * 255.0).round().astype(np.uint8), mode=mode) for a in array]


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (N,C,H,W) on the bottom/right so H and W are multiples of ``multiple``.

    Returns the padded tensor and the original (H, W), for :func:`crop_to_size` after the model.
    Reflect padding needs the pad to be smaller than the side; for tiny images we fall back to
    replicate padding, which has no such limit.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, (h, w)
    if mode == "reflect" and (pad_h >= h or pad_w >= w):
        mode = "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), (h, w)


def crop_to_size(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop (N,C,H,W) back to the top-left ``size`` = (H, W)."""
    return x[..., : size[0], : size[1]]


def save_image(image: PIL.Image.Image, path: str | os.PathLike) -> None:
    """Save atomically: the file appears complete or not at all."""
    from .utils import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fmt = PIL.Image.registered_extensions().get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"{path}: unknown image file extension {path.suffix!r}")
        if fmt == "JPEG" and image.mode == "RGBA":
            raise ValueError(f"{path}: JPEG cannot store an alpha channel; save as .png or .webp")
        image.save(tmp, format=fmt)
