"""Training plumbing: config, datasets, losses, schedules, EMA, atomic checkpoints, and a tiny run that learns."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from sr_diffusion.training import (
    CharbonnierLoss,
    CheckpointManager,
    ConfigError,
    ExperimentConfig,
    RegressionTask,
    Trainer,
    build_loss,
    build_train_dataset,
    build_validation_set,
    config_from_dict,
    config_to_dict,
    create_ema,
    load_config,
    parse_args,
)
from sr_diffusion.training.data import (
    SKIMAGE_SKLEARN_TRAIN,
    SKIMAGE_SKLEARN_VAL,
    BatchDegrader,
    SRTrainDataset,
    StepBatchSampler,
    build_train_dataloader,
    derive_seed,
    scan_images,
)
from sr_diffusion.training.ema import copy_with_ema_weights, load_ema, save_ema
from sr_diffusion.training.optim import build_lr_scheduler, build_optimizer, lr_factor

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "regression_tiny.yaml"
DEFAULT_X4 = REPO / "configs" / "regression_default_x4.yaml"


def tiny_config(tmp_path, *overrides: str) -> ExperimentConfig:
    return load_config(TINY, [f"train.output_dir={tmp_path / 'run'}", *overrides])


def tiny_model():
    from sr_diffusion.models import SRVGGNetCompact

    torch.manual_seed(0)
    return SRVGGNetCompact(num_feat=8, num_conv=2, upscale=4)


# ----------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------


def test_config_yaml_and_dotted_overrides(tmp_path):
    config = load_config(
        TINY,
        [
            "train.max_steps=7",
            "model.num_feat=16",
            "optim.betas=[0.8,0.95]",
            "optim.lr=1e-4",
            "train.checkpoints_total_limit=null",
            "data.degradation.type=realesrgan",
            "data.degradation.noise_range=[1,5]",
        ],
    )
    assert config.train.max_steps == 7
    assert config.model.arch == "edsr" and config.model.kwargs["num_feat"] == 16
    assert config.optim.betas == (0.8, 0.95) and config.optim.lr == pytest.approx(1e-4)
    assert config.train.checkpoints_total_limit is None
    assert config.data.degradation.type == "realesrgan"
    assert config.data.degradation.kwargs == {"noise_range": [1, 5]}
    # the open `model` section flattens back, so a saved config reloads to the same thing
    assert config_from_dict(config_to_dict(config)) == config
    assert config_to_dict(config)["model"] == {"arch": "edsr", "num_feat": 16, "num_block": 1}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_step=3", "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"),
        ("trian.max_steps=3", "unknown config key 'trian'"),
        ("train.max_steps=2.5", "train.max_steps: expected an integer"),
        ("train.loss=huber", "train.loss: must be one of 'l1', 'mse', 'charbonnier'"),
        ("data.use_hflip=maybe", "data.use_hflip: expected true/false"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("data.gt_size=30", "data.gt_size: must be a positive multiple of scale=4"),
        ("train.max_steps", "must look like section.key=value"),
        ("data.source=paired", "data.hr_dirs: is required"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert message in str(err.value)


def test_model_section_is_checked_against_the_architecture(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.num_feet .* valid keys: arch, num_in_ch"):
        Trainer(tiny_config(tmp_path, "model.num_feet=4"), RegressionTask())
    with pytest.raises(ConfigError, match="unknown regression architecture 'vdsr'"):
        Trainer(tiny_config(tmp_path, "model.arch=vdsr"), RegressionTask())
    with pytest.raises(ConfigError, match="differs from scale=4"):
        Trainer(tiny_config(tmp_path, "model.upscale=2"), RegressionTask())
    # a whole-section override swaps the architecture
    config = tiny_config(tmp_path, "model={arch: rrdbnet, num_feat: 8, num_block: 1, num_grow_ch: 4}")
    assert type(RegressionTask().build_model(config)).__name__ == "RRDBNet"


def test_parse_args_shortcuts_and_usage_errors(tmp_path, capsys):
    config = parse_args(
        [
            "--config",
            str(TINY),
            "--output_dir",
            str(tmp_path / "x:y"),
            "--resume_from_checkpoint",
            "latest",
            "train.seed=3",
        ]
    )
    assert config.train.output_dir == str(tmp_path / "x:y")  # taken verbatim, not parsed as YAML
    assert config.train.resume_from_checkpoint == "latest" and config.train.seed == 3
    config = parse_args(
        [
            "--config",
            str(TINY),
            "--checkpoints_total_limit",
            "2",
            "--checkpointing_steps",
            "7",
            "--max_train_steps",
            "30",
            "--seed",
            "5",
            "--mixed_precision",
            "bf16",
        ]
    )
    t = config.train
    assert (t.checkpoints_total_limit, t.checkpointing_steps, t.max_steps, t.seed) == (2, 7, 30, 5)
    assert t.mixed_precision == "bf16"
    with pytest.raises(SystemExit):
        parse_args(["--config", str(TINY), "train.nope=1"])
    assert "unknown config key 'train.nope'" in capsys.readouterr().err


def test_shipped_configs_are_valid():
    from sr_diffusion.training import build_regression_model

    for path in (TINY, DEFAULT_X4):
        config = load_config(path)
        model = build_regression_model(config)
        assert model.upscale == config.scale
    default = load_config(DEFAULT_X4)  # the shipped fallback trains on the photo corpus (training/prepare_photos.py)
    assert default.data.source == "folder" and default.data.hr_dirs == ["data/photos/train"]
    assert default.validation.hr_dirs == ["data/photos/val"] and default.model.kwargs["upsampler"] == "nearest_conv"


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------


def test_skimage_sklearn_split_is_disjoint_and_named(tmp_path):
    assert not set(SKIMAGE_SKLEARN_TRAIN) & set(SKIMAGE_SKLEARN_VAL)
    config = tiny_config(tmp_path, "validation.max_images=null")
    val = build_validation_set(config)
    assert [v.name for v in val] == list(SKIMAGE_SKLEARN_VAL)
    for item in val:
        assert item.hr.shape[-2:] == (64, 64) and item.lr.shape[-2:] == (16, 16)
        assert item.lr.min() >= 0 and item.lr.max() <= 1
    assert len(build_train_dataset(config)) == len(SKIMAGE_SKLEARN_TRAIN)


def test_bicubic_dataset_shapes_and_determinism(tmp_path):
    config = tiny_config(tmp_path)
    ds = build_train_dataset(config)
    sample = ds[5]
    assert sample["hr"].shape == (3, 32, 32) and sample["lr"].shape == (3, 8, 8)
    assert sample["hr"].dtype == torch.float32 and 0 <= sample["hr"].min() and sample["hr"].max() <= 1
    # the same position gives the same sample, in another dataset object too; other positions differ
    again = build_train_dataset(config)[5]
    assert torch.equal(sample["hr"], again["hr"]) and torch.equal(sample["lr"], again["lr"])
    assert not torch.equal(ds[6]["hr"], sample["hr"])
    # another seed gives other samples
    other = build_train_dataset(tiny_config(tmp_path, "train.seed=1"))[5]
    assert not torch.equal(other["hr"], sample["hr"])
    # every image once per epoch
    n = len(ds)
    assert sorted(ds.image_index(p) for p in range(n, 2 * n)) == list(range(n))
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)


def test_sampler_positions_resume_and_worker_count_do_not_change_batches(tmp_path):
    sampler = list(StepBatchSampler(batch_size=2, start_batch=0, num_batches=6))
    assert sampler[3] == [6, 7]
    assert list(StepBatchSampler(2, start_batch=3, num_batches=3)) == sampler[3:]
    # two processes split each global batch
    assert list(StepBatchSampler(2, 1, 1, process_index=1, num_processes=2)) == [[6, 7]]

    ds = build_train_dataset(tiny_config(tmp_path))
    full = [b["hr"] for b in build_train_dataloader(ds, 2, 0, 4, num_workers=0)]
    resumed = [b["hr"] for b in build_train_dataloader(ds, 2, 2, 2, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(full[2:], resumed))


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def test_folder_dataset_recursive_any_format_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    _save(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), tmp_path / "hr" / "a.png")
    _save(rng.integers(0, 255, (40, 40), dtype=np.uint8), tmp_path / "hr" / "sub" / "gray.bmp")
    _save(rng.integers(0, 255, (36, 44, 4), dtype=np.uint8), tmp_path / "hr" / "sub" / "rgba.webp")
    _save(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8), tmp_path / "hr" / "small.jpg")  # padded up
    _save(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), tmp_path / "hr" / "deep" / "x.TIF")
    (tmp_path / "hr" / "notes.txt").write_text("not an image")
    assert len(scan_images([tmp_path / "hr"])) == 5
    config = tiny_config(tmp_path, "data.source=folder", f"data.hr_dirs=[{tmp_path / 'hr'}]")
    ds = build_train_dataset(config)
    for p in range(10):
        sample = ds[p]
        assert sample["hr"].shape == (3, 32, 32) and sample["lr"].shape == (3, 8, 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_images([tmp_path / "missing"])


def test_paired_dataset_crops_are_aligned(tmp_path):
    rng = np.random.default_rng(1)
    for name, (h, w) in {"img1": (64, 80), "nested/img2": (72, 64)}.items():
        hr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        _save(hr, tmp_path / "hr" / f"{name}.png")
        # LR = every 4th pixel of HR (offset 1): an exact, checkable correspondence
        _save(np.ascontiguousarray(hr[1::4, 1::4]), tmp_path / "lr" / f"{name}x4.png")
    config = tiny_config(
        tmp_path,
        "data.source=paired",
        f"data.hr_dirs=[{tmp_path / 'hr'}]",
        f"data.lr_dirs=[{tmp_path / 'lr'}]",
        "data.lr_filename_tmpl={}x4",
    )
    ds = build_train_dataset(config)
    assert len(ds) == 2
    for p in range(12):
        sample = ds[p]
        assert sample["lr"].shape == (3, 8, 8)
        # flips/transposes are applied to both, so the correspondence survives up to the pixel offset
        hr, lr = sample["hr"], sample["lr"]
        candidates = [hr[:, a::4, b::4] for a in (1, 2) for b in (1, 2)]
        assert any(torch.equal(c, lr) for c in candidates)
    # validation pairs: center crops stay aligned too
    config.validation.source = "paired"
    config.validation.hr_dirs, config.validation.lr_dirs = config.data.hr_dirs, config.data.lr_dirs
    config.validation.lr_filename_tmpl, config.validation.crop_size = "{}x4", 40
    val = build_validation_set(config)
    assert len(val) == 2
    for item in val:
        assert item.lr.shape[-2:] == (10, 10) and item.hr.shape[-2:] == (40, 40)
        assert torch.equal(item.hr[..., 1::4, 1::4], item.lr)
    config.validation.source, config.validation.crop_size = "folder", None
    assert [tuple(v.hr.shape[-2:]) for v in build_validation_set(config)] == [(64, 80), (72, 64)]

    _save(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8), tmp_path / "lr" / "img1x4.png")
    with pytest.raises(ValueError, match="expected HR = LR x 4"):
        [build_train_dataset(config)[p] for p in range(2)]
    (tmp_path / "lr" / "img1x4.png").unlink()
    with pytest.raises(FileNotFoundError, match="no LR image img1x4"):
        build_train_dataset(config)


def test_on_the_fly_degradation_batch(tmp_path):
    config = tiny_config(tmp_path, "data.degradation.type=realesrgan")
    ds = build_train_dataset(config)
    sample = ds[0]
    assert set(sample) == {"hr", "kernels"} and "kernel1" in sample["kernels"]
    batch = next(iter(build_train_dataloader(ds, 2, 0, 1)))
    assert batch["kernels"]["kernel1"].shape[0] == 2
    degrader = BatchDegrader(ds.degradation, seed=0)
    out = degrader(batch, micro_batch=0)
    assert out["lr"].shape == (2, 3, 8, 8) and out["hr"].shape == (2, 3, 32, 32)
    assert torch.equal(degrader(batch, micro_batch=0)["lr"], out["lr"])  # keyed by the micro-batch
    assert not torch.equal(degrader(batch, micro_batch=1)["lr"], out["lr"])
    # BSRGAN has no per-sample half: the batch holds only HR, the step degrades it
    ds = build_train_dataset(tiny_config(tmp_path, "data.degradation.type=bsrgan"))
    batch = next(iter(build_train_dataloader(ds, 2, 0, 1)))
    assert set(batch) == {"hr"}
    assert BatchDegrader(ds.degradation, seed=0)(batch, 0)["lr"].shape == (2, 3, 8, 8)


def test_dataset_rejects_bad_crop():
    with pytest.raises(ValueError, match="multiple of scale"):
        SRTrainDataset([torch.zeros(3, 8, 8)], scale=4, gt_size=30)


# ----------------------------------------------------------------------------------------------------------
# losses, schedules, EMA
# ----------------------------------------------------------------------------------------------------------


def test_random_downscale_crops_a_shrunk_region():
    # a photo whose columns are 0..255: a crop of the photo shrunk by f spans ~gt/f columns of values
    ramp = torch.arange(256, dtype=torch.uint8).expand(3, 256, 256).contiguous()
    full = SRTrainDataset([ramp], scale=4, gt_size=32, use_hflip=False, use_rot=False)
    half = SRTrainDataset([ramp], scale=4, gt_size=32, use_hflip=False, use_rot=False, random_downscale=[0.5, 0.5])
    span = lambda hr: float(hr[0, 16, -2] - hr[0, 16, 1]) * 255  # noqa: E731
    assert span(full[0]["hr"]) == pytest.approx(29, abs=0.5)  # 32 columns, one grey level per column
    sample = half[0]
    assert sample["hr"].shape == (3, 32, 32) and sample["lr"].shape == (3, 8, 8)
    assert span(sample["hr"]) == pytest.approx(58, abs=2)  # 64 columns squeezed into 32
    assert torch.equal(sample["hr"], (sample["hr"] * 255).round() / 255)  # 8-bit, like a saved photo
    assert torch.equal(half[0]["hr"], sample["hr"])  # deterministic per position
    # a photo smaller than gt / f: the region is the whole shorter side, still resized to gt_size
    small = SRTrainDataset([ramp[:, :40, :40]], scale=4, gt_size=32, random_downscale=[0.25, 0.25])
    assert small[3]["hr"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="0 < lo <= hi <= 1"):
        SRTrainDataset([ramp], scale=4, gt_size=32, random_downscale=[0.5, 1.5])
    with pytest.raises(ValueError, match="unpaired"):
        SRTrainDataset([ramp], scale=4, gt_size=32, lr_items=[ramp[:, :64, :64]], random_downscale=[0.5, 1])


def test_losses():
    x, y = torch.tensor([[0.0, 0.5]]), torch.tensor([[0.3, 0.5]])
    assert build_loss("l1")(x, y).item() == pytest.approx(0.15)
    assert build_loss("mse")(x, y).item() == pytest.approx(0.045)
    expected = (math.sqrt(0.09 + 1e-6) + 1e-3) / 2
    assert build_loss("charbonnier")(x, y).item() == pytest.approx(expected)
    assert CharbonnierLoss(eps=1e-2)(y, y).item() == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("huber")


def test_lr_schedules(tmp_path):
    o = tiny_config(
        tmp_path, "optim.lr=1e-3", "optim.warmup_steps=4", "optim.scheduler=cosine", "optim.min_lr=1e-4"
    ).optim
    assert lr_factor(0, o, 100) == pytest.approx(0.25)
    assert lr_factor(4, o, 100) == pytest.approx(1.0)
    assert lr_factor(52, o, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, o, 100) == pytest.approx(0.1)
    o = tiny_config(
        tmp_path, "optim.scheduler=multistep", "optim.milestones=[3,6]", "optim.gamma=0.1", "optim.warmup_steps=0"
    ).optim
    assert [round(lr_factor(s, o, 10), 6) for s in (0, 2, 3, 5, 6, 9)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    model = tiny_model()
    opt = build_optimizer(model.parameters(), o)
    sched = build_lr_scheduler(opt, o, 10)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(o.lr * 0.1)


def test_ema_update_math_and_roundtrip(tmp_path):
    model = tiny_model()
    ema = create_ema(model, decay=0.9, update_after_step=0)
    assert create_ema(model, decay=None) is None and create_ema(model, decay=0.0) is None
    param = next(model.parameters())
    shadow = param.detach().clone()
    for t in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * t)
        ema.step(model.parameters())
        u = t - 1
        d = 0.0 if u <= 0 else min(0.9, (1 + u) / (10 + u))  # diffusers' EMA warmup, capped at decay
        shadow = shadow - (1 - d) * (shadow - param.detach())
        assert ema.cur_decay_value == pytest.approx(d)
        torch.testing.assert_close(ema.shadow_params[0], shadow, rtol=0, atol=1e-6)
    # the EMA folder restores the exact shadow weights and step counter
    save_ema(ema, tmp_path / "ema")
    other = create_ema(tiny_model(), decay=0.9)
    load_ema(other, tmp_path / "ema")
    assert other.optimization_step == 7
    assert all(torch.equal(a, b) for a, b in zip(other.shadow_params, ema.shadow_params))
    # a copy carries the EMA weights; the model keeps its own
    clone = copy_with_ema_weights(model, ema)
    assert torch.equal(next(clone.parameters()), ema.shadow_params[0])
    assert not torch.equal(next(model.parameters()), ema.shadow_params[0])
    assert not clone.training


# ----------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------


def _accelerator(tmp_path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path)))
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model


def test_checkpoint_crash_mid_save_keeps_previous_and_latest_ignores_partial(
    tmp_path, monkeypatch, fresh_accelerate_state
):
    accelerator, model = _accelerator(tmp_path)
    manager = CheckpointManager(tmp_path / "out", total_limit=2)
    assert manager.resolve("latest") is None and manager.latest() is None
    first = manager.save(accelerator, 2)
    assert first.name == "checkpoint-2" and manager.read_step(first) == 2
    files_before = sorted(p.relative_to(first) for p in first.rglob("*"))

    real_save_state = accelerator.save_state

    def crashing_save_state(output_dir, **kwargs):
        real_save_state(output_dir, **kwargs)  # files are written ...
        raise RuntimeError("simulated crash")  # ... but the process dies before the rename

    monkeypatch.setattr(accelerator, "save_state", crashing_save_state)
    with pytest.raises(RuntimeError, match="simulated crash"):
        manager.save(accelerator, 4)
    assert (tmp_path / "out" / ".checkpoint-4.tmp").is_dir()  # the partial save, hidden
    assert not (tmp_path / "out" / "checkpoint-4").exists()
    assert manager.resolve("latest") == first  # never the partial one
    assert sorted(p.relative_to(first) for p in first.rglob("*")) == files_before

    monkeypatch.setattr(accelerator, "save_state", real_save_state)
    manager.save(accelerator, 4)
    assert not (tmp_path / "out" / ".checkpoint-4.tmp").exists()
    manager.save(accelerator, 6)
    # pruned to the limit, oldest first, after the new one was in place
    assert [step for step, _ in manager.checkpoints()] == [4, 6]
    assert manager.resolve("latest").name == "checkpoint-6"
    assert manager.resolve("checkpoint-4") == tmp_path / "out" / "checkpoint-4"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        manager.resolve(tmp_path / "out" / "checkpoint-2")
    # re-saving an existing step replaces it in place
    manager.save(accelerator, 6)
    assert [step for step, _ in manager.checkpoints()] == [4, 6]


# ----------------------------------------------------------------------------------------------------------
# a tiny run in-process
# ----------------------------------------------------------------------------------------------------------


def test_tiny_run_learns_and_exports_a_pipeline(tmp_path, fresh_accelerate_state, one_thread):
    config = tiny_config(
        tmp_path,
        "train.max_steps=80",
        "train.report_to=none",
        "train.checkpointing_steps=0",
        "train.validation_steps=80",
        "validation.max_images=2",
        "data.batch_size=4",
    )
    result = Trainer(config, RegressionTask()).train()
    assert result.global_step == 80 and len(result.losses) == 80
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert last < 0.5 * first, (first, last)
    assert set(result.metrics) == {"psnr", "ssim", "psnr_bicubic", "ssim_bicubic"}
    assert math.isfinite(result.metrics["psnr"])
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # checkpointing disabled

    from sr_diffusion.pipelines import AutoSRPipeline, RegressionSRPipeline

    pipe = AutoSRPipeline.from_pretrained(result.pipeline_dir)
    assert isinstance(pipe, RegressionSRPipeline) and pipe.upscale == 4
    pipe.set_progress_bar_config(disable=True)
    out = pipe(torch.rand(1, 3, 12, 10), output_type="pt").images
    assert out.shape == (1, 3, 48, 40)


# ----------------------------------------------------------------------------------------------------------
# per-sample draws (the data-parallel contract)
# ----------------------------------------------------------------------------------------------------------


def test_per_sample_draws_do_not_depend_on_how_the_batch_is_split():
    from sr_diffusion.training import rng
    from sr_diffusion.training.data import make_generator

    def gens(positions):
        return [make_generator(0, 4, p) for p in positions]

    # a global batch of 4 drawn at once, or as two halves on two "processes": the same numbers, sample by sample
    for draw in (
        lambda g, n: rng.randint(0, 1000, n, g),
        lambda g, n: rng.rand(n, g),
        lambda g, n: rng.randn((n, 3, 2, 2), g),
    ):
        whole = draw(gens(range(4)), 4)
        halves = torch.cat([draw(gens(range(0, 2)), 2), draw(gens(range(2, 4)), 2)])
        assert torch.equal(whole, halves)
        # sample i's draw is the one its own generator makes
        assert torch.equal(whole[2:3], draw(gens([2]), 1))
    # one generator: exactly torch's batched draw (what tasks without per-sample generators, and tests, use)
    assert torch.equal(rng.randn((2, 3), make_generator(1)), torch.randn((2, 3), generator=make_generator(1)))
    assert torch.equal(rng.randint(0, 9, 5, make_generator(1)), torch.randint(0, 9, (5,), generator=make_generator(1)))
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        rng.rand(2, gens(range(3)))
    # the trainer's positions: rank r of P holds positions r*B ... (r+1)*B - 1 of each global micro-batch
    assert StepBatchSampler.positions(3, 2, process_index=1, num_processes=2) == [14, 15]
    assert StepBatchSampler.positions(3, 4) == [12, 13, 14, 15]


def test_launches_that_are_not_one_process_group_are_refused_or_flagged(monkeypatch, caplog):
    from sr_diffusion.training.trainer import _check_process_group

    for name in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    _check_process_group(1)  # plain python
    monkeypatch.setenv("WORLD_SIZE", "2")
    _check_process_group(2)  # torchrun, one group
    with pytest.raises(RuntimeError, match="not one data-parallel group"):
        _check_process_group(1)  # torchrun, but each process alone
    # `accelerate launch --cpu --num_processes 2` without mpirun: one process, MASTER_ADDR set, no WORLD_SIZE
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with caplog.at_level("WARNING", logger="sr_diffusion.training.trainer"):
        _check_process_group(1)
    assert "starts several CPU processes only with mpirun" in caplog.text
