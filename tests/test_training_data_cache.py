"""Training data from image folders: the per-worker decode cache (``data.image_cache_mb``) gives the same
samples as decoding every time, and ``data.include_bundled`` adds the bundled photos to a folder source."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from sr_diffusion.training import ConfigError, build_train_dataset, config_from_dict
from sr_diffusion.training import data as data_module
from sr_diffusion.training.data import SKIMAGE_SKLEARN_TRAIN, DecodedImageCache, SRTrainDataset


@pytest.fixture
def image_folder(tmp_path):
    """Three 8-bit PNGs (RGB, grayscale, RGBA) and one 16-bit grayscale PNG of different sizes."""
    folder = tmp_path / "hr"
    folder.mkdir()
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(folder / "a.png")
    PIL.Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8)).save(folder / "b.png")
    PIL.Image.fromarray(rng.integers(0, 256, (33, 47, 4), dtype=np.uint8)).save(folder / "c.png")
    PIL.Image.fromarray(rng.integers(0, 65536, (38, 34), dtype=np.uint16)).save(folder / "d.png")
    return folder


@pytest.mark.parametrize("random_downscale", [None, (0.5, 1.0)])
def test_decode_cache_gives_identical_samples_and_decodes_each_file_once(image_folder, monkeypatch, random_downscale):
    files = data_module.scan_images([image_folder])
    plain = SRTrainDataset(files, 2, 16, image_cache_mb=0, seed=3, random_downscale=random_downscale)
    cached = SRTrainDataset(files, 2, 16, seed=3, random_downscale=random_downscale)
    decoded = []
    real_load_rgb = data_module.load_rgb
    monkeypatch.setattr(data_module, "load_rgb", lambda path: decoded.append(Path(path).name) or real_load_rgb(path))
    for position in range(3 * len(files)):
        a, b = plain[position], cached[position]
        assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["lr"], b["lr"])
    assert sorted(decoded[3 * len(files) :]) == ["a.png", "b.png", "c.png", "d.png"]  # cached: once each
    assert cached.image_cache.decodes == len(files)
    dtypes = {Path(k).name: v.dtype for k, v in cached.image_cache._images.items()}
    assert dtypes == {"a.png": torch.uint8, "b.png": torch.uint8, "c.png": torch.uint8, "d.png": torch.float32}


def test_decode_cache_is_bounded_lru_and_not_pickled(image_folder):
    files = data_module.scan_images([image_folder])
    one_image = 3 * 40 * 52  # a.png in uint8
    cache = DecodedImageCache(one_image + 3 * 33 * 47)  # room for a.png and b.png, or a.png and c.png
    cache.get(files[0]), cache.get(files[1]), cache.get(files[0])  # a is now the most recently used
    assert cache.decodes == 2 and len(cache) == 2
    cache.get(files[2])  # evicts b, the least recently used
    assert [Path(k).name for k in cache._images] == ["a.png", "c.png"]
    assert cache.nbytes <= cache.max_bytes and cache.decodes == 3
    assert cache.get(files[3]).dtype == torch.float32  # 16-bit: float32 38x34, larger than the whole budget
    assert [Path(k).name for k in cache._images] == ["a.png", "c.png"] and cache.decodes == 4  # not kept
    copy = pickle.loads(pickle.dumps(cache))
    assert len(copy) == 0 and copy.max_bytes == cache.max_bytes and copy.nbytes == 0
    tiny = DecodedImageCache(10)  # every image is larger than the budget: returned, never kept
    assert torch.equal(tiny.get(files[0]), data_module._decode_compact(files[0])) and len(tiny) == 0


def test_config_include_bundled_and_image_cache_mb(image_folder):
    base = {"scale": 2, "data": {"source": "folder", "hr_dirs": [str(image_folder)], "gt_size": 16}}
    config = config_from_dict({**base, "data": {**base["data"], "include_bundled": True, "image_cache_mb": 64}})
    config.validate()
    dataset = build_train_dataset(config)
    assert len(dataset) == 4 + len(SKIMAGE_SKLEARN_TRAIN)
    assert all(isinstance(item, torch.Tensor) for item in dataset.hr_items[4:])
    assert dataset.image_cache.max_bytes == 64 * 2**20
    assert build_train_dataset(config_from_dict(base)).image_cache.max_bytes == 2048 * 2**20  # default
    assert len(build_train_dataset(config_from_dict(base))) == 4

    with pytest.raises(ConfigError, match=r"data\.include_bundled: .*data.source='skimage_sklearn'"):
        config_from_dict({"data": {"include_bundled": True}}).validate()
    with pytest.raises(ConfigError, match=r"data\.image_cache_mb: must be >= 0"):
        config_from_dict({"data": {"image_cache_mb": -1}}).validate()
    config_from_dict({"data": {"image_cache_mb": 0}}).validate()
