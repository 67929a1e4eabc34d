"""training/train_regression.py end to end, in subprocesses: ``accelerate launch``, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import accelerate_launch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "train_regression.py"
TINY = REPO / "configs" / "regression_tiny.yaml"

MAX_STEPS = 24
# One run, three ways: uninterrupted (accelerate launch, no data workers), killed, resumed (plain python,
# two data workers). The same config except the output folder and the number of workers.
RUN_ARGS = [
    "--config",
    str(TINY),
    f"train.max_steps={MAX_STEPS}",
    "train.checkpointing_steps=4",
    "train.checkpoints_total_limit=2",
    "train.validation_steps=8",
    "train.ema_decay=0.9",
    "optim.scheduler=cosine",
    "optim.warmup_steps=3",
]

pytestmark = pytest.mark.slow


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Same threads everywhere (bitwise CPU results depend on the reduction order); one is fastest for these
    # tiny convolutions. An empty HF_HOME, so no accelerate config file of the machine is read.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HOME=str(tmp / "hf_home"), PYTHONUNBUFFERED="1")
    return env


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key] - b[key]).abs().max()}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run, through ``accelerate launch`` on one CPU process."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    proc = accelerate_launch(SCRIPT, [*RUN_ARGS, f"train.output_dir={out}", "data.num_workers=0"], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_accelerate_launch_writes_checkpoints_logs_and_a_loadable_pipeline(reference_run):
    import sr_diffusion.models  # noqa: F401  (diffusers resolves the saved component's module among imported ones)
    from sr_diffusion.pipelines import AutoSRPipeline, RegressionSRPipeline

    # pruned to checkpoints_total_limit; no temporary folders left
    assert sorted(p.name for p in reference_run.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-24"]
    assert not [p for p in reference_run.iterdir() if p.name.startswith(".")]
    ckpt = reference_run / "checkpoint-24"
    for name in ("model/config.json", "ema/config.json", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        assert (ckpt / name).is_file(), name
    assert list((reference_run / "logs").rglob("events.out.tfevents.*"))
    assert (reference_run / "config.yaml").is_file()

    pipe = AutoSRPipeline.from_pretrained(reference_run / "pipeline")
    assert isinstance(pipe, RegressionSRPipeline)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(torch.rand(1, 3, 9, 11), output_type="pt").images.shape == (1, 3, 36, 44)
    # the exported weights are the EMA ones
    _assert_identical(_weights(reference_run / "pipeline" / "model"), _weights(ckpt / "ema"))


def test_sigkill_then_resume_latest_gives_bit_identical_weights(reference_run, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), *RUN_ARGS, f"train.output_dir={out}", "data.num_workers=2"]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-4").is_dir():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-4 after 240 s"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its data workers
    finally:
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "pipeline").exists(), "the run finished before it could be killed"
    killed_at = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert killed_at and killed_at[-1] < MAX_STEPS

    # a crash during a later save would leave a hidden temporary folder: make sure resume ignores one
    shutil.copytree(
        out / f"checkpoint-{killed_at[-1]}", out / f".checkpoint-{killed_at[-1] + 4}.tmp", dirs_exist_ok=True
    )
    resumed = subprocess.run(
        [*cmd, "--resume_from_checkpoint", "latest"],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Resuming from {out / f'checkpoint-{killed_at[-1]}'}" in resumed.stdout + resumed.stderr

    _assert_identical(_weights(out / "pipeline" / "model"), _weights(reference_run / "pipeline" / "model"))
    # the same exported config: the checkpoint resumed from leaves no trace in it (no _name_or_path)
    configs = [json.loads((run / "pipeline" / "model" / "config.json").read_text()) for run in (out, reference_run)]
    assert configs[0] == configs[1] and "_name_or_path" not in configs[0]
    for part in ("model", "ema"):
        _assert_identical(_weights(out / "checkpoint-24" / part), _weights(reference_run / "checkpoint-24" / part))
    opt_a = torch.load(out / "checkpoint-24" / "optimizer.bin", weights_only=True)
    opt_b = torch.load(reference_run / "checkpoint-24" / "optimizer.bin", weights_only=True)
    for key, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][key][name]), (key, name)
