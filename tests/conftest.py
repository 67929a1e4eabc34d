"""Shared fixtures: real photos bundled with scikit-image / scikit-learn, and tiny seeded models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real RGB photo (skimage's public-domain 'astronaut'), uint8 HxWx3, cropped to 128x96."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[40:136, 180:308])


@pytest.fixture(scope="session")
def photo_tensor(photo) -> torch.Tensor:
    """The same photo as a (1, 3, 96, 128) float tensor in [0, 1]."""
    return torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255.0


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread (and do not stall when the other core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
