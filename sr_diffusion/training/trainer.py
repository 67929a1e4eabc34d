"""The training loop every method shares: accelerate, EMA, atomic checkpoints, exact resume, validation.

A method plugs in a :class:`TrainingTask` (build the trainable model, compute the loss of a batch,
predict for validation, wrap the final model in its pipeline); :class:`Trainer` does the rest, after
diffusers' ``examples/controlnet/train_controlnet.py``: an ``Accelerator`` with a
``ProjectConfiguration``, save/load-state hooks that write diffusers-format ``model/`` and ``ema/``
subfolders into each checkpoint, ``--resume_from_checkpoint latest``, ``checkpoints_total_limit``,
tensorboard scalars and validation image grids.

Exact resume. A run killed at any instant and resumed with ``resume_from_checkpoint=latest`` ends with the
same weights, bit for bit (same device, same config), as one that was never interrupted, because
  * the checkpoint holds the model, optimizer, LR scheduler, EMA, the python/numpy/torch(/CUDA) RNG
    states and accelerate's micro-step counter, written atomically (:mod:`.checkpointing`);
  * the data position is a function of the optimizer step: training samples are addressed by their
    position in the run's sample stream (:class:`~sr_diffusion.training.data.StepBatchSampler`), and each
    sample's image, crop, flips and degradation kernels come from generators seeded by
    ``(seed, position)``; the task's own draws (e.g. diffusion noise) use generators seeded by
    ``(seed, position)`` (:attr:`TrainingTask.per_sample_generators`) or ``(seed, micro-batch, process)``, and
    the batched on-device degradation one seeded by ``(seed, micro-batch, process)``;
  * nothing between two optimizer steps draws from the global RNGs outside the model itself (the data
    loader gets its own generator; validation runs on a copy of the model under ``torch.no_grad``).

Data parallelism (``accelerate launch --num_processes P``, DDP). The contract, for the same seed and config:
``P`` processes with ``data.batch_size=B`` train
  * bit for bit the weights of one process with ``B`` and ``train.gradient_accumulation_steps=P`` (DDP's
    ``(g_0 + … + g_{P-1}) / P`` and the accumulated ``g_0/P + … + g_{P-1}/P`` are the same float operations
    for ``P = 2``; for other ``P`` they differ by rounding), and
  * the weights of one process with ``data.batch_size=P·B`` up to float32 rounding: the batch reductions run
    in another order. Adam's normalised step ``g / (|g| + eps)`` turns rounding into an O(lr) step for a
    parameter whose gradient cancels to the rounding level (e.g. a bias in front of a normalisation), and later
    steps spread it; a larger ``optim.eps`` keeps that difference at the rounding level too.
It holds because
  * optimizer step ``k`` reads the same samples either way: micro-batch ``b`` of process ``r`` holds stream
    positions ``(b·P + r)·B …`` (:class:`~sr_diffusion.training.data.StepBatchSampler`), i.e. rank ``r`` gets
    positions ``r·B … (r+1)·B - 1`` of the global batch, and every sample's image, crop, flips and kernels are
    seeded by its position, not by the process;
  * a task with :attr:`TrainingTask.per_sample_generators` gets one generator per sample, seeded by
    ``(seed, position)``, so the diffusion timesteps and noise of a sample do not depend on the split either
    (tasks without it get one generator per ``(micro-batch, process)``: same distribution, other draws);
  * the losses are means over equally sized per-sample terms and DDP averages the gradients over processes,
    so the averaged gradient is the gradient of the global-batch mean; clipping sees the averaged gradient;
  * the LR schedule counts optimizer steps (accelerate steps the scheduler ``P`` times per step and
    :func:`~sr_diffusion.training.optim.build_lr_scheduler` divides its counter by ``P``);
  * every process starts from the same seeded initialisation, and the EMA is updated on every process
    from the same synchronised weights, so it is identical on every rank.
Per-sample draws: regression (none), ResShift, SR3, SRDiff, StableSR (SFT), PASD and SeeSR. Outside the contract:
the tasks still on one generator per ``(micro-batch, process)`` (StableSR's CFW stage, the KL autoencoder's
posterior sample, the degradation estimator's synthetic degradations); on-the-fly ``realesrgan``/``bsrgan``
degradations, which draw batch-wide choices (resize factors and modes, as in Real-ESRGAN) per ``(micro-batch,
process)``; and dropout layers, which draw from each process's global RNG. They keep their distribution, not their
exact draws, when the batch is split.

Checkpoints are written once: the main process writes ``model/``, ``ema/``, the optimizer and the schedule,
every process its own ``random_states_{rank}.pkl``, and the main process publishes the folder with an atomic
rename (:mod:`.checkpointing`); on resume every process reads the same folder back (the weights, EMA and
optimizer state from the main process's files, its RNG state from its own). Validation, image logging,
trackers, ``config.yaml`` and the exported pipeline are main-process only; the logged ``train/loss`` is the mean
over processes (the global batch's loss).

Launching. On GPUs: ``accelerate launch --config_file configs/accelerate/multi_gpu.yaml`` (or ``multi_node``,
``fsdp``, ``deepspeed_zero2``). Several CPU processes (gloo, as the tests run): ``ACCELERATE_USE_CPU=true
accelerate launch --multi_gpu --num_processes 2 …``; ``accelerate launch --cpu --num_processes 2`` starts a single
process (accelerate spreads CPU processes only through ``mpirun``), and processes that a launcher started but
that did not join one group are refused (each would train alone into the same folder). Under FSDP the EMA
update, the checkpoint's ``model/``, validation and the export run inside ``FSDP.summon_full_params``; DDP and
DeepSpeed ZeRO-2 keep whole weights on every process (the CPU tests check the FSDP context on torch FSDP directly;
no whole FSDP or DeepSpeed run is tested).

``SR_DIFFUSION_STATE_DIGESTS=<dir>`` (a debugging hook, used by the tests): at the end of :meth:`Trainer.train`,
each process writes ``<dir>/rank{r}.json`` with the SHA-256 of every tensor of its model and EMA weights
(:func:`state_digests`), so that ranks can be compared with each other and with a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models.upsamplers import INTERPOLATION_MODES
from .checkpointing import CheckpointManager
from .config import ExperimentConfig, config_to_dict, save_config
from .data import (
    BatchDegrader,
    StepBatchSampler,
    build_train_dataloader,
    build_train_dataset,
    build_validation_set,
    make_generator,
)
from .ema import copy_with_ema_weights, create_ema, load_ema, save_ema
from .optim import build_lr_scheduler, build_optimizer
from .validation import validate

__all__ = ["TrainingTask", "Trainer", "TrainResult", "flatten_config", "state_digests", "STATE_DIGESTS_ENV"]

logger = logging.getLogger(__name__)

_TASK = 4  # purpose tag of the task's per-micro-batch generator (see data.derive_seed)
_VALIDATION = 5

#: environment variable naming a folder where each process writes its weights' digests at the end of training
STATE_DIGESTS_ENV = "SR_DIFFUSION_STATE_DIGESTS"


class TrainingTask(ABC):
    """What a method adds to the shared loop. The trainable model must be a diffusers ``ModelMixin``
    (it is checkpointed with ``save_pretrained`` / ``from_pretrained``)."""

    #: whether ``compute_loss`` applies ``train.phase_bias_weight`` (a pixel-space image loss); others refuse it
    supports_phase_bias: bool = False
    #: whether ``compute_loss`` takes one generator per sample (a list, seeded by each sample's stream position:
    #: draw with :mod:`sr_diffusion.training.rng`), which makes its draws independent of how a global batch is
    #: split across processes; otherwise it gets one generator per micro-batch and process
    per_sample_generators: bool = False

    def check_config(self, config: ExperimentConfig) -> None:
        """Raise early (``ConfigError``/``ValueError``) on settings this task cannot use (default: none)."""
        return None

    @abstractmethod
    def build_model(self, config: ExperimentConfig) -> torch.nn.Module:
        """The trainable model, freshly initialised (the global RNG is seeded with ``train.seed``)."""

    @abstractmethod
    def compute_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """Scalar loss of a micro-batch ``{"lr": (B,3,h,w), "hr": (B,3,H,W)}`` on the device, in [0, 1]: the mean
        of per-sample terms (so that data-parallel gradients average to the global batch's).
        ``generator`` (on the device; a list of ``B`` with :attr:`per_sample_generators`) is the only source of
        randomness the task may use."""

    @abstractmethod
    def predict(self, model: torch.nn.Module, lr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """SR (1, 3, H, W) in [0, 1] for an LR image (1, 3, h, w), with the eval-mode ``model``."""

    @abstractmethod
    def build_pipeline(self, model: torch.nn.Module):
        """The ``DiffusionPipeline`` to export at the end, around ``model`` (EMA weights, on CPU)."""

    def export_extras(self, model: torch.nn.Module, directory: Path) -> None:
        """Write files besides the exported pipeline into its folder ``directory`` (default: none)."""
        return None


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns (on every process)."""

    output_dir: Path
    global_step: int
    resumed_from: Path | None = None
    pipeline_dir: Path | None = None
    losses: list[float] = field(default_factory=list)  # per optimizer step run by this call
    metrics: dict[str, float] = field(default_factory=dict)  # last validation


def flatten_config(config: ExperimentConfig) -> dict[str, Any]:
    """``{"section.key": value}`` with values tensorboard's hparams accept (lists and None as strings)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
            return
        key = prefix[:-1]
        flat[key] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", config_to_dict(config))
    return flat


class Trainer:
    """Runs one training job described by an :class:`ExperimentConfig` for a :class:`TrainingTask`.

    Example::

        config = parse_args(description="...")
        Trainer(config, RegressionTask()).train()
    """

    def __init__(self, config: ExperimentConfig, task: TrainingTask):
        config.validate()
        if config.train.phase_bias_weight and not task.supports_phase_bias:
            from sr_diffusion.training.config import ConfigError

            raise ConfigError(
                f"train.phase_bias_weight: {type(task).__name__} has no pixel-space image loss to add it to"
            )
        task.check_config(config)
        self.config, self.task = config, task

    # ------------------------------------------------------------------------------------------ setup

    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        t = self.config.train
        output_dir = Path(t.output_dir)
        project_config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / t.logging_dir))
        return Accelerator(
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            mixed_precision=t.mixed_precision,
            log_with=None if t.report_to == "none" else t.report_to,
            project_config=project_config,
        )

    def _register_hooks(self, accelerator, ema) -> None:
        """Checkpoints hold diffusers model folders: ``model/`` (trained weights) and ``ema/``."""

        def save_model_hook(models, weights, output_dir):
            # written once, by the main process; every process drops accelerate's copy of the weights
            for model in models:
                with _full_weights(accelerator, model):  # a collective under FSDP: every process enters
                    if accelerator.is_main_process:
                        accelerator.unwrap_model(model).save_pretrained(Path(output_dir) / "model")
            if accelerator.is_main_process and ema is not None:
                save_ema(ema, Path(output_dir) / "ema")
            weights.clear()  # saved above; accelerate must not write model.safetensors too

        def load_model_hook(models, input_dir):
            while models:
                model = accelerator.unwrap_model(models.pop())
                loaded = type(model).from_pretrained(Path(input_dir) / "model")
                # its constructor arguments, not diffusers' bookkeeping (``_name_or_path`` would name the checkpoint
                # in every later save, the exported pipeline included)
                model.register_to_config(**{k: v for k, v in loaded.config.items() if not k.startswith("_")})
                model.load_state_dict(loaded.state_dict())
                del loaded
            if ema is not None:
                load_ema(ema, Path(input_dir) / "ema", device=accelerator.device)

        accelerator.register_save_state_pre_hook(save_model_hook)
        accelerator.register_load_state_pre_hook(load_model_hook)

    # ------------------------------------------------------------------------------------------ train

    def train(self) -> TrainResult:
        from accelerate.utils import send_to_device, set_seed
        from tqdm.auto import tqdm

        config, task = self.config, self.task
        t = config.train
        output_dir = Path(t.output_dir)
        accelerator = self._make_accelerator()
        ga = t.gradient_accumulation_steps
        rank, world = accelerator.process_index, accelerator.num_processes
        _check_process_group(world)

        # 1. Model, EMA, optimizer, schedule (seeded: a resumed run rebuilds the same initial state)
        set_seed(t.seed)
        model = task.build_model(config)
        if t.init_from and t.resume_from_checkpoint is None:
            switched = load_initial_weights(model, t.init_from)
            accelerator.print(f"Initialised {type(model).__name__} from {t.init_from}", *switched, sep="; ")
        model.train()
        ema = create_ema(model, t.ema_decay, t.ema_update_after_step)
        if ema is not None:
            ema.to(accelerator.device)
        optimizer = build_optimizer(model.parameters(), config.optim)
        lr_scheduler = build_lr_scheduler(optimizer, config.optim, t.max_steps, num_processes=world)
        self._register_hooks(accelerator, ema)
        if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed reads it from a prepared loader otherwise
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
                config.data.batch_size
            )
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

        # 2. Resume
        checkpoints = CheckpointManager(output_dir, t.checkpoints_total_limit)
        resume_dir = checkpoints.resolve(t.resume_from_checkpoint)
        global_step = 0
        if resume_dir is not None:
            accelerator.print(f"Resuming from {resume_dir}")
            accelerator.load_state(str(resume_dir))
            global_step = checkpoints.read_step(resume_dir)
        elif t.resume_from_checkpoint is not None:
            accelerator.print(f"No checkpoint in {output_dir}; starting a new run")

        # 3. Data, positioned at the first micro-batch of step `global_step`
        dataset = build_train_dataset(config)
        degrader = BatchDegrader(dataset.degradation, t.seed)
        start_batch = global_step * ga
        num_batches = max(0, t.max_steps - global_step) * ga
        dataloader = build_train_dataloader(
            dataset,
            config.data.batch_size,
            start_batch,
            num_batches,
            num_workers=config.data.num_workers,
            process_index=rank,
            num_processes=world,
            pin_memory=accelerator.device.type == "cuda",
        )
        validation_images = build_validation_set(config) if accelerator.is_main_process else []

        # 4. Trackers and the resolved config
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, output_dir / "config.yaml")
        if t.report_to != "none":
            accelerator.init_trackers(t.tracker_project_name, config=flatten_config(config))

        result = TrainResult(output_dir=output_dir, global_step=global_step, resumed_from=resume_dir)
        total_batch = config.data.batch_size * world * ga
        accelerator.print(
            f"Training {type(accelerator.unwrap_model(model)).__name__}: {len(dataset)} images, "
            f"{t.max_steps} steps of {total_batch} samples, starting at step {global_step}"
        )

        # 5. Loop
        progress = tqdm(
            total=t.max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
        )
        micro_batch = start_batch
        step_loss = torch.zeros((), device=accelerator.device)
        window: list[float] = []
        batch_size = config.data.batch_size
        for batch in dataloader:
            batch = degrader(send_to_device(batch, accelerator.device), micro_batch, rank)
            with accelerator.accumulate(model):
                if task.per_sample_generators:
                    positions = StepBatchSampler.positions(micro_batch, batch_size, rank, world)
                    generator = [make_generator(t.seed, _TASK, p, device=accelerator.device) for p in positions]
                else:
                    generator = make_generator(t.seed, _TASK, micro_batch, rank, device=accelerator.device)
                loss = task.compute_loss(model, batch, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.optim.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.optim.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach().float() / ga
            micro_batch += 1
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            if ema is not None:
                with _full_weights(accelerator, model):
                    ema.step(accelerator.unwrap_model(model).parameters())
            loss_value = float(accelerator.reduce(step_loss, reduction="mean") if world > 1 else step_loss)
            step_loss.zero_()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {global_step}")
            result.losses.append(loss_value)
            window.append(loss_value)
            progress.update(1)
            if global_step % t.log_steps == 0 or global_step == t.max_steps:
                logs = {"train/loss": sum(window) / len(window), "train/lr": lr_scheduler.get_last_lr()[0]}
                if ema is not None:
                    logs["train/ema_decay"] = ema.cur_decay_value
                progress.set_postfix(loss=f"{logs['train/loss']:.4g}")
                accelerator.log(logs, step=global_step)
                window.clear()

            if t.checkpointing_steps and global_step % t.checkpointing_steps == 0:
                path = checkpoints.save(accelerator, global_step)
                accelerator.print(f"Saved {path}")
            if t.validation_steps and global_step % t.validation_steps == 0:
                result.metrics = self._validate(accelerator, model, ema, validation_images, global_step)
        progress.close()

        # 6. Final state: a last checkpoint and validation if the schedule missed the last step,
        #    then the pipeline with the EMA weights
        if global_step > result.global_step or resume_dir is None:
            if t.checkpointing_steps and global_step % t.checkpointing_steps:
                checkpoints.save(accelerator, global_step)
            if t.validation_steps and global_step % t.validation_steps:
                result.metrics = self._validate(accelerator, model, ema, validation_images, global_step)
        result.global_step = global_step
        if os.environ.get(STATE_DIGESTS_ENV):
            _write_state_digests(Path(os.environ[STATE_DIGESTS_ENV]), accelerator, model, ema, global_step)
        result.pipeline_dir = self._export(accelerator, model, ema, output_dir / "pipeline")
        accelerator.end_training()
        return result

    # ------------------------------------------------------------------------------------------ helpers

    def _validate(self, accelerator, model, ema, images, step: int) -> dict[str, float]:
        """Score the EMA weights (a copy of the model) on the validation images; main process only."""
        metrics: dict[str, float] = {}
        eval_model = None
        with _full_weights(accelerator, model):
            if accelerator.is_main_process and images:
                # Building the copy initialises weights from the global RNG: fork it, so that the training
                # stream is the same whether or not a validation ran (a resumed run skips the one at its start).
                with _fork_global_rng(accelerator.device):
                    eval_model = copy_with_ema_weights(accelerator.unwrap_model(model), ema)
        if eval_model is not None:
            generator = make_generator(self.config.train.seed, _VALIDATION, step, device=accelerator.device)

            def predict(lr: torch.Tensor) -> torch.Tensor:
                with accelerator.autocast():  # the model in the training precision, the metrics in float32
                    return self.task.predict(eval_model, lr, generator).float()

            with torch.no_grad():
                metrics, grids = validate(
                    predict,
                    images,
                    self.config.scale,
                    device=accelerator.device,
                    num_log_images=self.config.validation.num_log_images,
                )
            del eval_model
            accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    for name, grid in grids:
                        tracker.writer.add_image(f"validation/{name}", grid, step, dataformats="HWC")
            accelerator.print(
                f"step {step}: PSNR {metrics['psnr']:.2f} dB (bicubic {metrics['psnr_bicubic']:.2f}), "
                f"SSIM {metrics['ssim']:.4f} (bicubic {metrics['ssim_bicubic']:.4f})"
            )
        accelerator.wait_for_everyone()
        return metrics

    def _export(self, accelerator, model, ema, directory: Path) -> Path:
        """Save ``task.build_pipeline(<EMA weights>)`` to ``directory`` atomically (main process)."""
        from sr_diffusion.utils import atomic_directory

        accelerator.wait_for_everyone()
        with _full_weights(accelerator, model), _fork_global_rng(accelerator.device):
            final_model = None
            if accelerator.is_main_process:
                final_model = copy_with_ema_weights(accelerator.unwrap_model(model), ema).to("cpu")
        if accelerator.is_main_process:
            pipeline = self.task.build_pipeline(final_model)
            with atomic_directory(directory) as tmp:
                pipeline.save_pretrained(tmp)
                self.task.export_extras(final_model, Path(tmp))
            accelerator.print(f"Saved pipeline to {directory}")
        accelerator.wait_for_everyone()
        return directory


#: config values that name different functions with the same parameters, so ``train.init_from`` may switch
#: between them: a nearest + conv upsampler fine-tunes into a bilinear + conv one (same convs).
INTERCHANGEABLE_CONFIG_VALUES = {"upsampler": frozenset(INTERPOLATION_MODES)}


def load_initial_weights(model: torch.nn.Module, folder: str | Path) -> list[str]:
    """Load a saved model folder's weights into ``model`` (``train.init_from``): same class and architecture (every
    config key but diffusers' bookkeeping must match, except a switch within :data:`INTERCHANGEABLE_CONFIG_VALUES`),
    every tensor present with its shape. Returns the switches made, ``"key: saved -> config"``."""
    from sr_diffusion.training.config import ConfigError

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"train.init_from: {folder} is not a saved model folder (no config.json)")
    saved = type(model).from_pretrained(folder)
    differ = {
        k: (v, model.config.get(k))
        for k, v in saved.config.items()
        if not k.startswith("_")
        and model.config.get(k) != v
        and not (isinstance(v, list) and list(model.config.get(k) or ()) == v)
    }
    switched = {k: pair for k, pair in differ.items() if set(pair) <= INTERCHANGEABLE_CONFIG_VALUES.get(k, frozenset())}
    wrong = {k: pair for k, pair in differ.items() if k not in switched}
    if wrong:
        raise ConfigError(f"train.init_from: {folder} has another architecture (saved, config): {wrong}")
    model.load_state_dict(saved.state_dict())
    return [f"{k}: {old} -> {new}" for k, (old, new) in switched.items()]


def _check_process_group(num_processes: int) -> None:
    """Refuse processes that a launcher started together but that did not join one process group: each would
    train alone on the full schedule and overwrite the others' checkpoints (e.g. ``accelerate launch --multi_gpu``
    on a machine without GPUs and without ``ACCELERATE_USE_CPU=true``)."""
    if "WORLD_SIZE" not in os.environ:  # not a torchrun-style launch (plain python, mpirun, ...): nothing to compare
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        if num_processes == 1 and cpu and "MASTER_ADDR" in os.environ:
            # what `accelerate launch --cpu --num_processes N` (N > 1, no --mpirun_hostfile) leaves behind
            logger.warning(
                "one process: `accelerate launch --cpu --num_processes N` starts several CPU processes only with "
                "mpirun (--mpirun_hostfile); use `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
                "--num_processes N` for N gloo processes"
            )
        return
    launched = int(os.environ["WORLD_SIZE"])
    if launched != num_processes:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate set up {num_processes}: the processes are "
            "not one data-parallel group. On CPU, launch with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            "--num_processes N ...` (gloo); on GPUs, check that every process sees its GPU."
        )


def state_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{name: SHA-256 hex}`` of each tensor's dtype, shape and bytes (on CPU): equal digests, equal tensors."""
    digests = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu", copy=True).contiguous()  # a copy: numpy() would pin the storage
        h = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        digests[name] = h.hexdigest()
    return digests


def _write_state_digests(directory: Path, accelerator, model, ema, step: int) -> None:
    """Each process writes ``directory/rank{r}.json``: its step and the digests of its model (state dict) and EMA
    (parameters, by name) weights (the :data:`STATE_DIGESTS_ENV` hook)."""
    with _full_weights(accelerator, model):
        unwrapped = accelerator.unwrap_model(model)
        record = {
            "rank": accelerator.process_index,
            "global_step": step,
            "model": state_digests(unwrapped.state_dict()),
        }
        if ema is not None:
            names = [name for name, _ in unwrapped.named_parameters()]
            record["ema"] = state_digests(dict(zip(names, ema.shadow_params)))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank{accelerator.process_index}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def _full_weights(accelerator, model):
    """Inside it, the unwrapped ``model`` holds its full weights on every process. Under FSDP (fully sharded add-ons,
    ``configs/accelerate/fsdp.yaml``) that is ``FSDP.summon_full_params`` (a collective: every process must enter;
    ``use_orig_params`` makes the original parameters the full tensors), for the EMA update, the checkpoint's
    ``model/`` folder, validation and the export; DDP and DeepSpeed ZeRO-2 keep whole weights on every process."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(model, writeback=False)


def _fork_global_rng(device: torch.device):
    """``torch.random.fork_rng`` for the CPU generator and, on CUDA, the device's."""
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)
