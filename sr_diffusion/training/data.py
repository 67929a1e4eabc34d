"""Training and validation data for super-resolution: image folders, paired LR/HR folders, bundled photos.

Determinism. Every random draw (which image, crop position, flips, degradation kernels) comes from a
``torch.Generator`` seeded from ``(seed, what, sample position)`` by :func:`derive_seed`; nothing reads
``random``, ``numpy.random`` or torch's global generator. A sample position is the index of the sample
in the run's stream of training samples: micro-batch ``b`` of process ``r`` (of ``P``) holds positions
``(b·P + r)·B … (b·P + r)·B + B - 1``. :class:`StepBatchSampler` yields those positions starting at any
micro-batch, so a resumed run reads exactly the batches the uninterrupted one would have read, whatever
the number of data workers. Position ``p`` maps to image ``perm_e[p mod N]`` with ``e = p // N`` and
``perm_e`` a permutation seeded by ``(seed, e)``: every image once per epoch.

LR synthesis (``data.degradation.type``):
  * ``bicubic``: MATLAB ``imresize`` by ``1/scale`` in the workers, clamped and rounded to 8 bits (as
    benchmark LR images saved to PNG);
  * ``realesrgan``: the workers sample per-sample kernels (``degradation.sample_kernels(generator)``) next
    to the HR crop; :class:`BatchDegrader` applies the batched degradation on the training device with a
    generator seeded by the micro-batch index. ``bsrgan`` has no per-sample half: the whole degradation
    runs in the step, on the device, with that generator.
  * ``paired`` data: LR crops at ``(top, left)``, HR crops at ``(top·scale, left·scale)``.

The built-in ``skimage_sklearn`` source (:data:`SKIMAGE_SKLEARN_TRAIN`, :data:`SKIMAGE_SKLEARN_VAL`):
photos that ship inside the scikit-image and scikit-learn wheels (no download). Licenses, from their
docstrings: astronaut, hubble_deep_field, rocket: public domain (NASA, SpaceX); camera, chelsea,
coffee, cell, retina, brick, grass, gravel: CC0; coins, immunohistochemistry: "no known copyright
restrictions"; scikit-learn's china and flower: CC BY 2.0 (Flickr users danielbuechele and vultilion).
Grayscale photos are repeated to RGB. Held out for validation, never trained on: ``chelsea``,
``coffee``, ``rocket`` and ``flower``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from sr_diffusion.utils import IMAGE_EXTENSIONS

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIMAGE_SKLEARN_TRAIN",
    "SKIMAGE_SKLEARN_VAL",
    "derive_seed",
    "make_generator",
    "scan_images",
    "load_rgb",
    "load_skimage_sklearn",
    "quantize",
    "bicubic_downsample",
    "random_crop_pair",
    "augment",
    "DecodedImageCache",
    "SRTrainDataset",
    "StepBatchSampler",
    "BatchDegrader",
    "ValidationImage",
    "build_degradation",
    "build_synthetic",
    "build_train_dataset",
    "build_train_dataloader",
    "build_validation_set",
]


#: Bundled photos used for training by ``data.source: skimage_sklearn`` ("library/name").
SKIMAGE_SKLEARN_TRAIN = (
    "skimage/astronaut",
    "skimage/camera",
    "skimage/brick",
    "skimage/grass",
    "skimage/gravel",
    "skimage/coins",
    "skimage/immunohistochemistry",
    "skimage/hubble_deep_field",
    "skimage/retina",
    "skimage/cell",
    "sklearn/china",
)
#: Bundled photos held out for validation (``validation.source: skimage_sklearn``).
SKIMAGE_SKLEARN_VAL = ("skimage/chelsea", "skimage/coffee", "skimage/rocket", "sklearn/flower")

# Purposes mixed into derived seeds, so that streams never collide.
_EPOCH, _SAMPLE, _DEGRADE, _SYNTHETIC, _PALETTE = 1, 2, 3, 4, 5


# ----------------------------------------------------------------------------------------------------------
# seeds and generators
# ----------------------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (``seed``, purpose, index, …) via BLAKE2b: distinct tuples give
    unrelated streams, the same tuple always the same one."""
    data = b"".join(int(p).to_bytes(16, "little", signed=True) for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def make_generator(*parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


# ----------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------


def scan_images(dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Every image file under ``dirs`` (recursive, :data:`IMAGE_EXTENSIONS`, any case), sorted per folder."""
    files: list[Path] = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(f"image folder {d} does not exist")
        found = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {d}")
        files.extend(found)
    return files


def load_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to RGB (3, H, W) float32 in [0, 1] (any PIL mode; alpha is dropped)."""
    from sr_diffusion.image_processor import SRImageProcessor

    return SRImageProcessor().preprocess(path).rgb[0]


def _to_uint8_chw(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    array = array[..., :3]
    if array.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


@functools.cache
def _load_bundled(name: str) -> torch.Tensor:
    library, photo = name.split("/", 1)
    if library == "skimage":
        import skimage.data

        return _to_uint8_chw(getattr(skimage.data, photo)())
    if library == "sklearn":
        # Read the JPEG that ships in the wheel directly: importing sklearn.datasets is slow.
        spec = importlib.util.find_spec("sklearn")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("scikit-learn is needed for the skimage_sklearn data source")
        path = Path(spec.submodule_search_locations[0]) / "datasets" / "images" / f"{photo}.jpg"
        return (load_rgb(path) * 255).round().to(torch.uint8)
    raise ValueError(f"unknown bundled photo {name!r}")


def load_skimage_sklearn(split: str = "train") -> list[tuple[str, torch.Tensor]]:
    """The bundled photos of ``split`` (``"train"`` or ``"val"``) as ``(name, uint8 (3, H, W))`` pairs."""
    names = {"train": SKIMAGE_SKLEARN_TRAIN, "val": SKIMAGE_SKLEARN_VAL}.get(split)
    if names is None:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return [(name, _load_bundled(name)) for name in names]


def _as_float(img: torch.Tensor) -> torch.Tensor:
    return img.float() / 255.0 if img.dtype == torch.uint8 else img.float()


def quantize(img: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8 bits, as an image saved to PNG."""
    return (img.clamp(0, 1) * 255.0).round() / 255.0


def bicubic_downsample(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """MATLAB bicubic ``imresize(hr, 1/scale)`` (antialiased), quantized to 8 bits; (…, H, W) → (…, H/s, W/s)."""
    from sr_diffusion.resize import imresize

    h, w = hr.shape[-2:]
    return quantize(imresize(hr, size=(h // scale, w // scale)))


def _pad_to_at_least(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pad (C, H, W) at the bottom/right (reflect, or replicate when too small) to at least (h, w)."""
    ph, pw = max(0, h - img.shape[-2]), max(0, w - img.shape[-1])
    if ph == 0 and pw == 0:
        return img
    mode = "reflect" if ph < img.shape[-2] and pw < img.shape[-1] else "replicate"
    return F.pad(_as_float(img)[None], (0, pw, 0, ph), mode=mode)[0]


def random_crop_pair(
    hr: torch.Tensor, lr: torch.Tensor | None, gt_size: int, scale: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random ``gt_size`` crop of ``hr`` (C, H, W) and, when given, the aligned ``gt_size/scale`` crop of ``lr``.

    The position is drawn on the LR grid (``top, left``) and the HR crop taken at ``(top·s, left·s)``, so
    both crops cover the same scene. Images smaller than the crop are padded first.
    """
    lr_size = gt_size // scale
    if lr is None:
        hr = _pad_to_at_least(hr, gt_size, gt_size)
        grid_h, grid_w = hr.shape[-2] // scale, hr.shape[-1] // scale
    else:
        lr = _pad_to_at_least(lr, lr_size, lr_size)
        hr = _pad_to_at_least(hr, lr.shape[-2] * scale, lr.shape[-1] * scale)
        grid_h, grid_w = lr.shape[-2], lr.shape[-1]
    top = int(torch.randint(0, grid_h - lr_size + 1, (), generator=generator))
    left = int(torch.randint(0, grid_w - lr_size + 1, (), generator=generator))
    hr_crop = hr[:, top * scale : top * scale + gt_size, left * scale : left * scale + gt_size]
    lr_crop = None if lr is None else lr[:, top : top + lr_size, left : left + lr_size]
    return hr_crop, lr_crop


def augment(
    images: Sequence[torch.Tensor], generator: torch.Generator, hflip: bool = True, rot: bool = True
) -> list[torch.Tensor]:
    """The same random dihedral transform of every (C, H, W) image: horizontal flip (p=0.5) and, with
    ``rot``, vertical flip (p=0.5) and transpose (p=0.5), i.e. any of the 8 flips/rot90s (BasicSR)."""
    draws = torch.rand(3, generator=generator)
    out = []
    for img in images:
        if hflip and draws[0] < 0.5:
            img = img.flip(-1)
        if rot and draws[1] < 0.5:
            img = img.flip(-2)
        if rot and draws[2] < 0.5:
            img = img.transpose(-2, -1)
        out.append(img.contiguous())
    return out


# ----------------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------------

ImageItem = Any  # a Path (decoded on access) or an in-memory uint8/float (3, H, W) tensor


def _load_item(item: ImageItem) -> torch.Tensor:
    return item if isinstance(item, torch.Tensor) else load_rgb(item)


def _decode_compact(path: str | os.PathLike) -> torch.Tensor:
    """:func:`load_rgb` of ``path``, stored as uint8 (3, H, W) when that is lossless, else float32.

    The uint8 form is kept only if ``u8.float() / 255`` reproduces the float decode exactly (8-bit
    files), so a crop of it converted by ``_as_float`` is bit-identical to the same crop of the float
    image; 16-bit and float files stay float32.
    """
    rgb = load_rgb(path)
    u8 = (rgb * 255.0).round_().to(torch.uint8)
    return u8 if torch.equal(_as_float(u8), rgb) else rgb


class DecodedImageCache:
    """Decoded training images of one process (or data worker), least-recently-used first out.

    ``get(path)`` decodes an image file once (:func:`_decode_compact`: uint8 (3, H, W) for 8-bit files,
    4x smaller than float32) and keeps it while the cached images fit in ``max_bytes``; an image larger
    than the whole budget is returned without being kept. ``max_bytes=0`` disables caching. The cache
    is not pickled (DataLoader workers start empty and fill their own); ``decodes`` counts file decodes.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.decodes = 0

    def __len__(self) -> int:
        return len(self._images)

    def __getstate__(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_bytes"])

    def get(self, path: str | os.PathLike) -> torch.Tensor:
        key = os.fspath(path)
        img = self._images.get(key)
        if img is not None:
            self._images.move_to_end(key)
            return img
        img = _decode_compact(path)
        self.decodes += 1
        size = img.numel() * img.element_size()
        if size > self.max_bytes:
            return img
        while self.nbytes + size > self.max_bytes:
            _, evicted = self._images.popitem(last=False)
            self.nbytes -= evicted.numel() * evicted.element_size()
        self._images[key] = img
        self.nbytes += size
        return img


class SRTrainDataset(Dataset):
    """Random training crops; ``dataset[p]`` is the sample at stream position ``p`` (any int >= 0).

    Returns a dict of float32 tensors in [0, 1]: ``hr`` (3, gt, gt) and either ``lr`` (3, gt/s, gt/s)
    (paired or bicubic data) or ``kernels`` (whatever ``degradation.sample_kernels`` returns).

    Args:
        hr_items: HR images (paths or (3, H, W) tensors).
        scale: SR factor. gt_size: HR crop side (a multiple of ``scale``).
        lr_items: LR images aligned with ``hr_items`` (paired data), or None.
        degradation: ``"bicubic"`` or an object with ``sample_kernels(generator)`` (on-the-fly
            degradation), ignored with ``lr_items``.
        use_hflip, use_rot: augmentations (:func:`augment`). seed: the run's seed.
        random_downscale: ``(lo, hi)`` with ``0 < lo <= hi <= 1``, or None. Unpaired data only: the HR
            crop is cut from the photo shrunk by a factor drawn uniformly from ``[lo, hi]`` (a
            ``gt_size / f`` region, MATLAB-bicubic resized to ``gt_size``), the multi-scale augmentation
            that gives a few large photos the sharper per-pixel statistics of smaller ones.
        synthetic: an image generator with ``render(size, generator)`` (e.g.
            :class:`~sr_diffusion.training.synthetic.DeadLeaves`), or None. Unpaired data only.
        synthetic_fraction: the probability that a sample's HR crop is rendered by ``synthetic`` instead
            of cut from a photo (drawn per position from its own stream, so photo samples are unchanged).
        image_cache_mb: budget of the per-process :class:`DecodedImageCache` for images given as paths
            (each DataLoader worker has its own); 0 decodes the file for every sample. Samples are
            identical either way.
    """

    def __init__(
        self,
        hr_items: Sequence[ImageItem],
        scale: int,
        gt_size: int,
        *,
        lr_items: Sequence[ImageItem] | None = None,
        degradation: Any = "bicubic",
        use_hflip: bool = True,
        use_rot: bool = True,
        seed: int = 0,
        random_downscale: Sequence[float] | None = None,
        synthetic: Any = None,
        synthetic_fraction: float = 0.0,
        image_cache_mb: float = 2048,
    ):
        if not hr_items:
            raise ValueError("the training set is empty")
        if lr_items is not None and len(lr_items) != len(hr_items):
            raise ValueError(f"{len(lr_items)} LR images for {len(hr_items)} HR images")
        if gt_size % scale:
            raise ValueError(f"gt_size={gt_size} must be a multiple of scale={scale}")
        self.hr_items = list(hr_items)
        self.lr_items = None if lr_items is None else list(lr_items)
        self.scale, self.gt_size = int(scale), int(gt_size)
        self.degradation = degradation
        self.use_hflip, self.use_rot = use_hflip, use_rot
        self.seed = int(seed)
        self.random_downscale = _check_downscale_range(random_downscale)
        if self.random_downscale is not None and lr_items is not None:
            raise ValueError("random_downscale needs unpaired data (an LR made from the HR crop)")
        if not 0 <= synthetic_fraction <= 1:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
        if synthetic_fraction > 0 and synthetic is None:
            raise ValueError("synthetic_fraction > 0 needs a synthetic image generator")
        if synthetic_fraction > 0 and lr_items is not None:
            raise ValueError("synthetic images need unpaired data (an LR made from the HR crop)")
        self.synthetic, self.synthetic_fraction = synthetic, float(synthetic_fraction)
        if image_cache_mb < 0:
            raise ValueError(f"image_cache_mb must be >= 0, got {image_cache_mb}")
        self.image_cache = DecodedImageCache(int(image_cache_mb * 2**20))

    def _load(self, item: ImageItem) -> torch.Tensor:
        """An item as a (3, H, W) tensor: in-memory tensors as they are, files through the decode cache."""
        if isinstance(item, torch.Tensor):
            return item
        return self.image_cache.get(item) if self.image_cache.max_bytes > 0 else load_rgb(item)

    def __len__(self) -> int:
        """The number of distinct images (one epoch); positions beyond it wrap into later epochs."""
        return len(self.hr_items)

    def image_index(self, position: int) -> int:
        epoch, offset = divmod(int(position), len(self.hr_items))
        return _epoch_permutation(self.seed, len(self.hr_items), epoch)[offset]

    def __getitem__(self, position: int) -> dict[str, Any]:
        if position < 0:
            raise IndexError(f"sample positions are >= 0, got {position}")
        generator = make_generator(self.seed, _SAMPLE, position)
        if self.synthetic_fraction > 0:
            synthetic_generator = make_generator(self.seed, _SYNTHETIC, position)
            if float(torch.rand((), generator=synthetic_generator)) < self.synthetic_fraction:
                return self._with_lr(self.synthetic.render(self.gt_size, synthetic_generator), generator)
        index = self.image_index(position)
        hr = self._load(self.hr_items[index])
        lr = None
        if self.lr_items is not None:
            lr = self._load(self.lr_items[index])
            _check_pair(hr, lr, self.scale, self.hr_items[index])
        if self.random_downscale is None:
            hr, lr = random_crop_pair(hr, lr, self.gt_size, self.scale, generator)
            hr, lr = _as_float(hr), None if lr is None else _as_float(lr)
        else:
            hr = _downscaled_crop(hr, self.gt_size, self.random_downscale, generator)
        if lr is not None:
            hr, lr = augment([hr, lr], generator, self.use_hflip, self.use_rot)
            return {"hr": hr, "lr": lr}
        (hr,) = augment([hr], generator, self.use_hflip, self.use_rot)
        return self._with_lr(hr, generator)

    def _with_lr(self, hr: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
        """The sample of an unpaired HR crop: its bicubic LR, its degradation kernels, or the HR alone."""
        if isinstance(self.degradation, str):
            if self.degradation != "bicubic":
                raise ValueError(f"unknown degradation {self.degradation!r}")
            return {"hr": hr, "lr": bicubic_downsample(hr, self.scale)}
        if hasattr(self.degradation, "sample_kernels"):
            return {"hr": hr, "kernels": self.degradation.sample_kernels(generator)}
        return {"hr": hr}  # a degradation without a per-sample half (BSRGAN) runs whole in the step


def _check_downscale_range(value: Sequence[float] | None) -> tuple[float, float] | None:
    if value is None:
        return None
    lo, hi = (float(v) for v in value)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"random_downscale must be (lo, hi) with 0 < lo <= hi <= 1, got {list(value)}")
    return lo, hi


def _downscaled_crop(
    hr: torch.Tensor, gt_size: int, factor_range: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """A float ``gt_size`` crop of ``hr`` (C, H, W) shrunk by ``f ~ U[lo, hi]``: a ``round(gt_size / f)``
    region (at most the photo's shorter side) resized to ``gt_size`` by MATLAB bicubic and rounded to 8 bits."""
    from sr_diffusion.resize import imresize

    lo, hi = factor_range
    factor = lo + (hi - lo) * float(torch.rand((), generator=generator))
    region = max(gt_size, min(round(gt_size / factor), *hr.shape[-2:]))
    crop, _ = random_crop_pair(hr, None, region, 1, generator)
    crop = _as_float(crop)
    if region == gt_size:
        return crop
    return quantize(imresize(crop, size=(gt_size, gt_size)))


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, n: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=make_generator(seed, _EPOCH, epoch)).tolist()


def _check_pair(hr: torch.Tensor, lr: torch.Tensor, scale: int, name: Any) -> None:
    (H, W), (h, w) = hr.shape[-2:], lr.shape[-2:]
    if not (h * scale <= H < (h + 1) * scale and w * scale <= W < (w + 1) * scale):
        raise ValueError(f"{name}: HR is {W}x{H} but LR is {w}x{h}; expected HR = LR x {scale} (up to a mod-crop)")


class StepBatchSampler(Sampler[list[int]]):
    """Yields the sample positions of micro-batches ``start_batch, …, start_batch + num_batches - 1``.

    Micro-batch ``b`` of process ``r`` holds positions ``(b·P + r)·B + i``, ``i < B``: a pure function of
    ``b``, so a run resumed at optimizer step ``k`` starts at ``b = k · gradient_accumulation_steps``.
    """

    def __init__(
        self, batch_size: int, start_batch: int, num_batches: int, process_index: int = 0, num_processes: int = 1
    ):
        self.batch_size, self.start_batch, self.num_batches = int(batch_size), int(start_batch), int(num_batches)
        self.process_index, self.num_processes = int(process_index), int(num_processes)

    def __len__(self) -> int:
        return self.num_batches

    @staticmethod
    def positions(micro_batch: int, batch_size: int, process_index: int = 0, num_processes: int = 1) -> list[int]:
        """The sample positions of micro-batch ``micro_batch`` of process ``process_index``: positions
        ``process_index·B … (process_index+1)·B - 1`` of the global micro-batch ``micro_batch`` of ``P·B``."""
        base = (int(micro_batch) * int(num_processes) + int(process_index)) * int(batch_size)
        return list(range(base, base + int(batch_size)))

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start_batch, self.start_batch + self.num_batches):
            yield self.positions(b, self.batch_size, self.process_index, self.num_processes)


class BatchDegrader:
    """Makes the LR half of a training batch on the training device.

    ``batch`` holds ``hr`` and either ``lr`` (returned as is), ``kernels`` (per-sample parameters from the
    workers: ``degradation.apply(hr, kernels, generator)``) or nothing else (``degradation(hr, generator)``,
    e.g. BSRGAN). The generator lives on ``hr``'s device, seeded by ``(seed, micro_batch, process_index)``.
    """

    def __init__(self, degradation: Any, seed: int):
        self.degradation, self.seed = degradation, int(seed)

    def __call__(self, batch: dict[str, Any], micro_batch: int, process_index: int = 0) -> dict[str, torch.Tensor]:
        hr = batch["hr"]
        if "lr" in batch:
            return {"lr": batch["lr"], "hr": hr}
        if self.degradation is None or isinstance(self.degradation, str):
            raise ValueError("this batch has no LR images and no on-the-fly degradation is configured")
        generator = make_generator(self.seed, _DEGRADE, micro_batch, process_index, device=hr.device)
        if "kernels" in batch:
            lr = self.degradation.apply(hr, batch["kernels"], generator)
        else:
            lr = self.degradation(hr, generator)
        return {"lr": lr, "hr": hr}


# ----------------------------------------------------------------------------------------------------------
# builders from the config
# ----------------------------------------------------------------------------------------------------------


def build_degradation(degradation_config, scale: int):
    """``"bicubic"`` or a ``RealESRGANDegradation`` / ``BSRGANDegradation`` from ``data.degradation``."""
    kind = degradation_config.type
    if kind == "bicubic":
        return "bicubic"
    from sr_diffusion import degradations as deg

    options = dict(degradation_config.kwargs)
    if options.setdefault("scale", scale) != scale:
        raise ValueError(f"data.degradation.scale={options['scale']} differs from scale={scale}")
    if kind == "realesrgan":
        return deg.RealESRGANDegradation(deg.RealESRGANDegradationConfig.from_dict(options))
    if kind == "bsrgan":
        return deg.BSRGANDegradation(deg.BSRGANDegradationConfig.from_dict(options))
    raise ValueError(f"unknown degradation type {kind!r}")


def _paired_files(hr_dirs, lr_dirs, tmpl: str) -> tuple[list[Path], list[Path]]:
    """Match every HR image with the LR image of the same relative path (name via ``tmpl``)."""
    hr_files, lr_files = [], []
    for hr_dir, lr_dir in zip(hr_dirs, lr_dirs):
        hr_dir, lr_dir = Path(hr_dir), Path(lr_dir)
        lr_by_key = {p.relative_to(lr_dir).with_suffix("").as_posix(): p for p in scan_images([lr_dir])}
        for hr in scan_images([hr_dir]):
            rel = hr.relative_to(hr_dir)
            key = rel.with_name(tmpl.format(rel.stem)).as_posix()
            if key not in lr_by_key:
                raise FileNotFoundError(f"no LR image {key}.* in {lr_dir} for HR image {hr}")
            hr_files.append(hr)
            lr_files.append(lr_by_key[key])
    return hr_files, lr_files


def build_train_dataset(config) -> SRTrainDataset:
    """The training dataset of an :class:`~sr_diffusion.training.config.ExperimentConfig`."""
    data, scale = config.data, config.scale
    lr_items = None
    degradation: Any = None
    if data.source == "skimage_sklearn":
        hr_items = [img for _, img in load_skimage_sklearn("train")]
    elif data.source == "folder":
        hr_items = scan_images(data.hr_dirs)
        if data.include_bundled:
            hr_items += [img for _, img in load_skimage_sklearn("train")]
    elif data.source == "paired":
        hr_items, lr_items = _paired_files(data.hr_dirs, data.lr_dirs, data.lr_filename_tmpl)
    else:
        raise ValueError(f"unknown data.source {data.source!r}")
    if lr_items is None:
        degradation = build_degradation(data.degradation, scale)
    synthetic = build_synthetic(data.synthetic, hr_items, config.train.seed) if data.synthetic.fraction > 0 else None
    return SRTrainDataset(
        hr_items,
        scale,
        data.gt_size,
        lr_items=lr_items,
        degradation=degradation,
        use_hflip=data.use_hflip,
        use_rot=data.use_rot,
        seed=config.train.seed,
        random_downscale=data.random_downscale,
        synthetic=synthetic,
        synthetic_fraction=data.synthetic.fraction,
        image_cache_mb=data.image_cache_mb,
    )


def build_synthetic(synthetic_config, hr_items: Sequence[ImageItem], seed: int, palette_images: int = 32):
    """The :class:`~sr_diffusion.training.synthetic.DeadLeaves` generator of ``data.synthetic``; a ``photos``
    palette holds 65536 pixels of (at most ``palette_images`` evenly spaced) training images."""
    from sr_diffusion.training.synthetic import DeadLeaves, photo_palette

    c = synthetic_config
    palette = None
    if c.palette == "photos":
        step = max(1, len(hr_items) // palette_images)
        images = [_load_item(item) for item in list(hr_items)[::step][:palette_images]]
        palette = photo_palette(images, 65536, make_generator(seed, _PALETTE))
    elif c.palette != "uniform":
        raise ValueError(f"data.synthetic.palette must be 'photos' or 'uniform', got {c.palette!r}")
    try:
        return DeadLeaves(
            r_min=c.r_min,
            r_max=c.r_max,
            alpha=c.alpha,
            supersample=c.supersample,
            shading=c.shading,
            blur_sigma=tuple(c.blur_sigma),
            palette=palette,
        )
    except ValueError as error:  # name the config section, as every other config error does
        from .config import ConfigError

        raise ConfigError(f"data.synthetic: {error}") from error


def build_train_dataloader(
    dataset: SRTrainDataset,
    batch_size: int,
    start_batch: int,
    num_batches: int,
    *,
    num_workers: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over micro-batches ``start_batch …`` of :class:`StepBatchSampler` (per process)."""
    sampler = StepBatchSampler(batch_size, start_batch, num_batches, process_index, num_processes)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        # The loader draws its workers' base seed from this generator, not torch's global one, so
        # creating a loader on resume does not shift the global RNG stream.
        generator=torch.Generator().manual_seed(dataset.seed),
    )


@dataclass
class ValidationImage:
    """One validation pair: ``lr`` (1, 3, h, w) and ``hr`` (1, 3, h·s, w·s), float32 in [0, 1]."""

    name: str
    lr: torch.Tensor
    hr: torch.Tensor


def _center_crop(img: torch.Tensor, size: int | None, multiple: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    if size is not None:
        h, w = min(h, size), min(w, size)
    h, w = h - h % multiple, w - w % multiple
    top, left = (img.shape[-2] - h) // 2, (img.shape[-1] - w) // 2
    return img[..., top : top + h, left : left + w]


def build_validation_set(config) -> list[ValidationImage]:
    """The held-out images of ``config.validation`` (LR by MATLAB bicubic unless paired)."""
    val, scale = config.validation, config.scale
    pairs: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
    if val.source == "none":
        return []
    if val.source == "skimage_sklearn":
        pairs = [(name, _as_float(img), None) for name, img in load_skimage_sklearn("val")]
    elif val.source == "folder":
        pairs = [(str(p), load_rgb(p), None) for p in scan_images(val.hr_dirs)]
    elif val.source == "paired":
        hr_files, lr_files = _paired_files(val.hr_dirs, val.lr_dirs, val.lr_filename_tmpl)
        pairs = [(str(h), load_rgb(h), load_rgb(lr)) for h, lr in zip(hr_files, lr_files)]
    else:
        raise ValueError(f"unknown validation.source {val.source!r}")
    if val.max_images is not None:
        pairs = pairs[: val.max_images]
    images = []
    for name, hr, lr in pairs:
        if lr is None:
            hr = _center_crop(hr, val.crop_size, scale)
            lr = bicubic_downsample(hr, scale)
        else:
            _check_pair(hr, lr, scale, name)
            h, w = lr.shape[-2:]
            ch, cw = (
                (h, w) if val.crop_size is None else (min(h, val.crop_size // scale), min(w, val.crop_size // scale))
            )
            top, left = (h - ch) // 2, (w - cw) // 2
            lr = lr[:, top : top + ch, left : left + cw]
            hr = hr[:, top * scale : (top + ch) * scale, left * scale : (left + cw) * scale]
        images.append(ValidationImage(name, lr[None].contiguous(), hr[None].contiguous()))
    return images
