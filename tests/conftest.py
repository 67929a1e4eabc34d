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


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's state objects are process-wide singletons; reset them around tests that build one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread (and do not stall when the other core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def accelerate_launch(script, args, tmp_path, timeout: int = 300):
    """Run ``accelerate launch`` of a training script on one CPU process, as CI does; returns the process.

    No accelerate config file is needed: every launcher setting is given. Single-threaded, with a private
    HF_HOME so nothing outside ``tmp_path`` is touched.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    launcher = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HOME": str(Path(tmp_path) / "hf_home"),
           "PYTHONUNBUFFERED": "1"}
    cmd = [str(launcher), "launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *map(str, args)]
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
