"""``sr-diffusion upscale`` on several processes: ``accelerate launch -m sr_diffusion.cli upscale``.

Two real processes (torchrun through ``accelerate launch --multi_gpu``, gloo on the CPU) must write the files of a
one-process run, byte for byte, print one summary, and resume with ``--skip-existing``. The agreement between
processes (the same exit status everywhere, a setup error on one stopping all) is also checked in-process, with the
other process simulated.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import sr_diffusion.distributed
from sr_diffusion.cli import main
from sr_diffusion.distributed import Processes, launched_processes

#: The input images: (relative path, height, width); sizes differ so that a swapped result cannot pass
IMAGES = [("a.png", 16, 20), ("b.png", 12, 16), ("d.png", 20, 12), ("e.png", 8, 8), ("sub/c.png", 16, 16)]


def accelerate_launch_upscale(args, tmp_path, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``python -m sr_diffusion.cli upscale ARGS`` on ``processes`` CPU processes.

    ``--cpu`` would start one process (accelerate runs several CPU processes only through mpirun), so this launches
    with ``--multi_gpu`` (torchrun) and ACCELERATE_USE_CPU: gloo, on the CPU, with or without GPUs. One thread each, a
    private HF_HOME and a free rendezvous port (tests running beside it may hold the default one).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    for name in sr_diffusion.distributed.WORLD_SIZE_VARIABLES:
        env.pop(name, None)
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "sr_diffusion.cli", "upscale", *map(str, args)]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def write_inputs(folder: Path, photo: np.ndarray) -> None:
    for index, (name, height, width) in enumerate(IMAGES):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(photo[4 * index : 4 * index + height, 8 * index : 8 * index + width]).save(folder / name)


@pytest.fixture(scope="module")
def resshift_dir(tmp_path_factory):
    """A tiny sampling pipeline (ResShift, pixel-unshuffle UNet)."""
    from test_pipeline_resshift import tiny_scheduler, tiny_unshuffle_unet

    from sr_diffusion.pipelines import ResShiftPipeline

    folder = tmp_path_factory.mktemp("resshift")
    ResShiftPipeline(unet=tiny_unshuffle_unet(), scheduler=tiny_scheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, photo, resshift_dir):
    """The tiny sampling pipeline over five images, upscaled with ``--seed`` in this process (one thread, as the
    launched ones) to ``ref/``, then by two launched processes to ``out/``."""
    root = tmp_path_factory.mktemp("distributed")
    write_inputs(root / "in", photo)
    args = ["--model", resshift_dir, "--seed", "7"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["upscale", str(root / "in"), "-o", str(root / "ref"), "-q", *map(str, args)]) == 0
    finally:
        torch.set_num_threads(threads)
    launched = accelerate_launch_upscale([root / "in", "-o", root / "out", *args], root)
    return root, args, launched


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_processes_write_the_files_of_one(run):
    """Same files, byte for byte (every image's noise from --seed, whichever process draws it); one summary line and
    one progress bar (the main process's: its 3 of the 5 images), no temporary files."""
    root, _, launched = run
    assert launched.returncode == 0, launched.stderr[-3000:]
    reference = outputs(root / "ref")
    assert sorted(reference) == sorted(name for name, _, _ in IMAGES)
    assert outputs(root / "out") == reference
    out = root / "out"
    assert launched.stdout.splitlines() == [f"wrote 5 image(s) in {out}: a.png, b.png, d.png, e.png, sub/c.png"]
    bars = re.findall(r"upscale \(main of 2 processes\):.*?\| *\d+/(\d+) ", launched.stderr)
    assert bars and set(bars) == {"3"}  # split_between_processes: 3 and 2; only the main process's bar
    assert not re.search(r"\d+/2 \[", launched.stderr)
    assert "warning" not in launched.stderr and "error" not in launched.stderr


def test_resume_with_skip_existing(run, tmp_path):
    """An interrupted run (two outputs missing) resumed on two processes: only the missing ones are written (the
    others keep their mtime), byte-identical to the one-process run; a bad file handled by the second process makes
    every process fail, with one summary and one count from the main process."""
    root, args, _ = run
    shutil.copytree(root / "in", tmp_path / "in")
    shutil.copytree(root / "out", tmp_path / "out")
    (tmp_path / "in" / "zz.png").write_text("not an image")  # last: in the second process's share
    for name in ("b.png", "sub/c.png"):
        (tmp_path / "out" / name).unlink()
    kept = {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in ("a.png", "d.png", "e.png")}
    launched = accelerate_launch_upscale([tmp_path / "in", "-o", tmp_path / "out", "--skip-existing", "-q", *args],
                                         tmp_path)  # fmt: skip
    assert launched.returncode != 0
    out = tmp_path / "out"
    assert launched.stdout.splitlines() == [
        f"wrote 2 image(s) in {out}: b.png, sub/c.png",
        f"skipped (--skip-existing: the output exists) 3 image(s) in {out}: a.png, d.png, e.png",
    ]
    errors = [line for line in launched.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "zz.png" in errors[0]
    assert launched.stderr.count("1 of 6 image(s) failed") == 1
    assert outputs(out) == outputs(root / "ref")
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept


# ---------------------------------------------------------------------------------------------------
# the agreement between processes, with the other process simulated


class OneOfTwo(Processes):
    """Process ``index`` of two; the other is simulated by ``replies``: its objects in the collectives, in order
    (gather: its object; broadcast to process 1: the main process's). The share is accelerate's split (3 and 2 of 5)."""

    distributed = True
    num_processes = 2
    device = None

    def __init__(self, index: int, replies: list):
        self.state = None
        self.index = index
        self.replies = list(replies)

    @property
    def process_index(self) -> int:
        return self.index

    @property
    def is_main_process(self) -> bool:
        return self.index == 0

    def split(self, items):
        half = -(-len(items) // 2)
        return list(items[:half] if self.index == 0 else items[half:])

    def gather(self, obj):
        other = self.replies.pop(0)
        return [obj, other] if self.index == 0 else [other, obj]

    def broadcast(self, obj):
        return obj if self.index == 0 else self.replies.pop(0)


@pytest.fixture(scope="module")
def regression_dir(tmp_path_factory):
    from sr_diffusion.models import SRVGGNetCompact
    from sr_diffusion.pipelines import RegressionSRPipeline

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("regression")
    RegressionSRPipeline(model=SRVGGNetCompact(num_feat=8, num_conv=2, upscale=4)).save_pretrained(folder)
    return folder


@pytest.fixture
def inputs(tmp_path, photo):
    write_inputs(tmp_path / "in", photo)
    return tmp_path / "in"


def as_process(monkeypatch, processes: OneOfTwo) -> OneOfTwo:
    monkeypatch.setattr(sr_diffusion.distributed, "Processes", lambda: processes)
    return processes


def test_a_failure_on_the_other_process_fails_this_one(monkeypatch, regression_dir, inputs, tmp_path, capsys):
    """The second process upscales its share (the last 2 of 5) without error; the main one failed an image: this
    process exits 1 too, and prints no summary (the main process does)."""
    processes = as_process(monkeypatch, OneOfTwo(1, [None, [0, 1, 2, 3, 4], ([0, 1], 1)]))
    out = tmp_path / "out"
    assert main(["upscale", str(inputs), "-o", str(out), "--model", str(regression_dir), "-q"]) == 1
    assert processes.replies == []  # every collective was reached
    assert capsys.readouterr().out == ""
    assert sorted(outputs(out)) == ["e.png", "sub/c.png"]  # its share only


def test_the_main_process_sums_every_process(monkeypatch, regression_dir, inputs, tmp_path, capsys):
    """The main process writes its share (3 of 5) and reports the whole run: the other's written files and failure."""
    as_process(monkeypatch, OneOfTwo(0, [None, ([4], 1)]))
    out = tmp_path / "out"
    assert main(["upscale", str(inputs), "-o", str(out), "--model", str(regression_dir), "-q"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"wrote 4 image(s) in {out}: a.png, b.png, d.png, sub/c.png"]
    assert captured.err.splitlines() == ["1 of 5 image(s) failed"]
    assert sorted(outputs(out)) == ["a.png", "b.png", "d.png"]


def test_without_seed_the_main_process_warns(monkeypatch, resshift_dir, inputs, tmp_path, capsys):
    """A sampling pipeline without --seed draws from each process's global RNG, so its files depend on the split:
    the main process says so, once; with --seed, nothing is said."""
    out = tmp_path / "out"
    base = ["upscale", str(inputs / "a.png"), "-o", str(out), "--model", str(resshift_dir), "-q"]
    as_process(monkeypatch, OneOfTwo(0, [None, ([], 0)]))
    assert main(base) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: without --seed, ResShiftPipeline's noise depends on how the images are shared")
    as_process(monkeypatch, OneOfTwo(0, [None, ([], 0)]))
    assert main([*base, "-o", str(tmp_path / "seeded"), "--seed", "0"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("index", "model", "other", "code", "err"),
    [  # the other process could not load (say, its GPU): the main one reports it, all stop before any work
        (0, "ok", ("--device cuda:1: no usable CUDA GPU", 2), 2, "error: --device cuda:1: no usable CUDA GPU\n"),
        # the same error on both: the main process reports it once, the other stays silent
        (1, "missing", ("{missing}: no such model", 2), 2, ""),
        # different errors: each, by process; the largest exit status
        (0, "missing", ("KeyError: 'x' (SR_DIFFUSION_TRACEBACK=1 shows where)", 1), 2, "error: process 0: "),
    ],
)
def test_a_setup_error_on_any_process_stops_all(
    monkeypatch, regression_dir, inputs, tmp_path, capsys, index, model, other, code, err
):
    missing = tmp_path / "missing"
    folder = regression_dir if model == "ok" else missing
    if other[0].startswith("{missing}"):  # the message this process's own error gives
        assert main(["upscale", str(inputs), "-o", str(tmp_path / "o"), "--model", str(folder)]) == 2
        other = (capsys.readouterr().err.removeprefix("error: ").strip(), other[1])
    processes = as_process(monkeypatch, OneOfTwo(index, [other]))
    assert main(["upscale", str(inputs), "-o", str(tmp_path / "out"), "--model", str(folder), "-q"]) == code
    assert processes.replies == []
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(err) and len(captured.err.splitlines()) == int(bool(err))
    if index == 0 and model == "missing":
        assert "process 1: KeyError" in captured.err
    assert not (tmp_path / "out").exists()


def test_a_plain_run_creates_no_accelerate_state(monkeypatch, regression_dir, inputs, tmp_path, fresh_accelerate_state):
    """Without a launcher (or launched as one process), upscale is the one-process command: accelerate's state is
    never created, so nothing about the device choice changes."""
    from accelerate import PartialState

    for name in sr_diffusion.distributed.WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert launched_processes() == 1
    assert main(["upscale", str(inputs), "-o", str(tmp_path / "out"), "--model", str(regression_dir), "-q"]) == 0
    assert PartialState._shared_state == {}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched_processes() == 1 and not Processes().distributed
    assert PartialState._shared_state == {}
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert launched_processes() == 3
