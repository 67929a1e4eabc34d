"""Atomic, pruned ``accelerate`` checkpoints: ``output_dir/checkpoint-{step}``.

A checkpoint is written by ``accelerator.save_state`` into ``output_dir/.checkpoint-{step}.tmp`` (every
process writes its own RNG file there), then renamed to ``checkpoint-{step}`` by the main process. The
rename is atomic, so a ``checkpoint-*`` directory is always complete: a crash or SIGKILL while saving
leaves only the hidden temporary directory, which :meth:`CheckpointManager.latest` never returns and
the next save removes. Older checkpoints are pruned to ``total_limit`` only after the new one is in
place, so the previous good checkpoint exists at every instant.

Contents (with :class:`~sr_diffusion.training.trainer.Trainer`'s hooks): ``model/`` and ``ema/`` (diffusers
model folders), ``optimizer.bin``, ``scheduler.bin``, ``random_states_{rank}.pkl`` (python, numpy, torch
and CUDA RNGs, plus accelerate's micro-step counter), ``training_state.json`` (``global_step``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

__all__ = ["CHECKPOINT_PREFIX", "CheckpointManager"]

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
STATE_FILE = "training_state.json"


class CheckpointManager:
    """Lists, resolves, saves and prunes the checkpoints of one run directory."""

    def __init__(self, output_dir: str | os.PathLike, total_limit: int | None = None):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"total_limit must be >= 1 or None, got {total_limit}")
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit

    # ------------------------------------------------------------------ listing

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as ``(step, path)``, oldest first (temporary directories excluded)."""
        if not self.output_dir.is_dir():
            return []
        found = []
        for path in self.output_dir.iterdir():
            match = _CHECKPOINT_RE.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        """The checkpoint with the highest step, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def path_for(self, step: int) -> Path:
        return self.output_dir / f"{CHECKPOINT_PREFIX}{step}"

    def temp_path_for(self, step: int) -> Path:
        return self.output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"

    def resolve(self, resume_from_checkpoint: str | os.PathLike | None) -> Path | None:
        """``None`` → None; ``"latest"`` → :meth:`latest` (None when there is none yet, so that a
        first run started with ``--resume_from_checkpoint latest`` starts fresh); a path or a
        ``checkpoint-N`` name inside ``output_dir`` → that directory (must exist)."""
        if resume_from_checkpoint is None:
            return None
        if str(resume_from_checkpoint) == "latest":
            return self.latest()
        path = Path(resume_from_checkpoint)
        if not path.is_dir() and (self.output_dir / path).is_dir():
            path = self.output_dir / path
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {resume_from_checkpoint} does not exist")
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        return path

    @staticmethod
    def read_step(path: str | os.PathLike) -> int:
        """The optimizer step a checkpoint was taken at."""
        return int(json.loads((Path(path) / STATE_FILE).read_text())["global_step"])

    # ------------------------------------------------------------------ saving

    def save(self, accelerator, step: int, extra_state: dict | None = None) -> Path:
        """Write ``checkpoint-{step}`` atomically with ``accelerator.save_state``; every process must call it.

        Returns the final path. An existing ``checkpoint-{step}`` (e.g. after resuming from an older
        checkpoint) is replaced only once the new one is complete.
        """
        final, tmp = self.path_for(step), self.temp_path_for(step)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash during an earlier save
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(os.fspath(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"global_step": int(step), **(extra_state or {})}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            _fsync_tree(tmp)
            if final.exists():
                old = self.output_dir / f".{CHECKPOINT_PREFIX}{step}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.output_dir)
            self.prune(keep=final)
        accelerator.wait_for_everyone()
        return final

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Delete the oldest checkpoints beyond ``total_limit`` (never ``keep``); returns what was removed."""
        if self.total_limit is None:
            return []
        found = [p for _, p in self.checkpoints() if keep is None or p != keep]
        excess = len(found) + (1 if keep is not None else 0) - self.total_limit
        removed = found[: max(0, excess)]
        for path in removed:
            # Rename first so that a crash mid-delete never leaves a partial checkpoint-N behind.
            trash = path.with_name(f".{path.name}.deleting")
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return removed


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk (best effort) before the rename publishes it."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
