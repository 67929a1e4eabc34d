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


def free_port() -> int:
    """A TCP port free right now on localhost (for a multi-process launch's rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(
    script, args, tmp_path, timeout: int = 300, num_processes: int = 1, launch_args=(), env=None, popen: bool = False
):
    """Run ``accelerate launch`` of a training script on ``num_processes`` CPU processes (gloo), as CI does;
    returns the finished process (or, with ``popen``, the running ``subprocess.Popen``, in its own session,
    output to ``tmp_path/launch.log``).

    No accelerate config file is needed: every launcher setting is given (``launch_args``, e.g.
    ``["--config_file", path]``, come first, so the settings given here override the file's). Each process is
    single-threaded, with a private HF_HOME so nothing outside ``tmp_path`` is touched; several processes meet
    on a free localhost port. ``env`` adds environment variables.

    Several CPU processes: ``accelerate launch --cpu --num_processes 2`` starts ONE process in accelerate 1.x
    (its CPU launcher spreads processes with ``mpirun`` only, given ``--mpirun_hostfile``), so the processes are
    started by the torchrun launcher (``--multi_gpu``) with ``ACCELERATE_USE_CPU=true``, which makes each of
    them a gloo ``MULTI_CPU`` rank (the trainer refuses a launch whose processes did not join one group).
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    launcher = Path(sys.executable).with_name("accelerate")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HOME": str(Path(tmp_path) / "hf_home"),
        "PYTHONUNBUFFERED": "1",
        "ACCELERATE_USE_CPU": "true",
        **(env or {}),
    }
    cmd = [
        str(launcher),
        "launch",
        *map(str, launch_args),
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if num_processes > 1:
        cmd += ["--multi_gpu", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    else:
        cmd += ["--cpu"]
    cmd += [str(script), *map(str, args)]
    if popen:
        with open(Path(tmp_path) / "launch.log", "w") as log:  # the child keeps its own descriptor
            return subprocess.Popen(
                cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
