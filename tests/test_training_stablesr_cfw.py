"""StableSR's CFW stage: config checks, the loss trains the fusion layers only (the VAE and the first stage untouched,
for both latent sources), a learning test on real photo crops, and `accelerate launch` of ``train_stablesr.py --stage
cfw`` writing the first-stage pipeline with its new CFW layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import accelerate_launch
from stablesr_tiny import save_sd_base, tiny_components

from sr_diffusion.training import ConfigError, load_config
from sr_diffusion.training.stablesr_cfw import StableSRCFWExperimentConfig, StableSRCFWTask

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "stablesr_cfw_tiny.yaml"
SCRIPT = REPO / "training" / "train_stablesr.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random SD folder (its ``vae/`` is what the CFW layers are trained for)."""
    return save_sd_base(tiny_components(), tmp_path_factory.mktemp("sd_base"))


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory) -> Path:
    """A saved tiny StableSR pipeline without CFW layers: the "trained" first stage that generates the latents."""
    from sr_diffusion.pipelines import StableSRPipeline

    folder = tmp_path_factory.mktemp("stablesr") / "pipeline"
    StableSRPipeline(**tiny_components(cfw=False)).save_pretrained(folder)
    return folder


def tiny_config(tmp_path, *overrides: str) -> StableSRCFWExperimentConfig:
    return load_config(TINY, [f"train.output_dir={tmp_path / 'run'}", *overrides], cls=StableSRCFWExperimentConfig)


def test_config_errors_name_the_key(tmp_path, base, first_stage):
    with pytest.raises(ConfigError, match="cfw.pipeline: required"):
        tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        tiny_config(tmp_path, f"cfw.base={base}", f"cfw.pipeline={first_stage}")
    with pytest.raises(ConfigError, match="cfw.latents: 'generated'.*give cfw.pipeline"):
        tiny_config(tmp_path, f"cfw.base={base}", "cfw.latents=generated")
    with pytest.raises(ConfigError, match="validation.source: must be 'none' without cfw.pipeline"):
        tiny_config(tmp_path, f"cfw.base={base}", "validation.source=skimage_sklearn")
    with pytest.raises(ConfigError, match="cfw.base: .* \\(no vae/config.json\\)"):
        tiny_config(tmp_path, f"cfw.base={tmp_path}")
    with pytest.raises(ConfigError, match="cfw.pipeline: .* \\(no model_index.json\\)"):
        tiny_config(tmp_path, f"cfw.pipeline={base}")
    with pytest.raises(ConfigError, match="cfw.fidelity_weight"):
        tiny_config(tmp_path, f"cfw.base={base}", "cfw.fidelity_weight=0")
    with pytest.raises(ConfigError, match="model.block_out_channels: set by the VAE"):
        tiny_config(tmp_path, f"cfw.base={base}", "model.block_out_channels=[32,32,64]")
    with pytest.raises(ConfigError, match="model.bogus"):
        tiny_config(tmp_path, f"cfw.base={base}", "model.bogus=1")
    with pytest.raises(ConfigError, match="data.gt_size \\(34\\) must be a multiple of 4"):
        StableSRCFWTask().check_config(tiny_config(tmp_path, f"cfw.base={base}", "scale=2", "data.gt_size=34"))
    # the pipeline samples at the UNet's multiple too: f = 4 times 2
    with pytest.raises(ConfigError, match="data.gt_size \\(36\\) must be a multiple of 8"):
        StableSRCFWTask().check_config(tiny_config(tmp_path, f"cfw.pipeline={first_stage}", "data.gt_size=36"))
    # the original's optimizer settings are the defaults
    default = load_config(None, [f"cfw.base={base}", "cfw.latents=hr", "validation.source=none"],
                          cls=StableSRCFWExperimentConfig)  # fmt: skip
    assert default.optim.lr == 5e-5 and tuple(default.optim.betas) == (0.5, 0.9) and default.train.loss == "l1"
    assert default.cfw.fidelity_weight == 1.0


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("latents", ["hr", "generated"])
def test_only_the_fusion_layers_train(tmp_path, base, first_stage, latents):
    """A few optimizer steps of the task's loss change every fusion-layer weight and nothing of the VAE (nor of the
    first stage's UNet, time-aware encoder and SFT layers); the loss's every draw comes from the generator."""
    source = f"cfw.base={base}" if latents == "hr" else f"cfw.pipeline={first_stage}"
    config = tiny_config(tmp_path, source, f"cfw.latents={latents}", "cfw.num_inference_steps=2")
    task = StableSRCFWTask()
    task.check_config(config)
    torch.manual_seed(0)
    model = task.build_model(config)
    assert list(model.cfw.config.block_out_channels) == [32, 32, 64] and model.cfw.levels == [1]
    names = [name for name, _ in model.named_parameters()]
    assert names and all(name.startswith("cfw.fusion_layer_") for name in names)

    frozen = {"vae": task.vae()}
    if latents == "generated":
        pipe = task.pipeline()
        frozen |= {"unet": pipe.unet, "time_aware_encoder": pipe.time_aware_encoder, "sft": pipe.sft}
    before = {name: _state(module) for name, module in frozen.items()}
    trained_before = _state(model)

    g = torch.Generator().manual_seed(0)
    batch = {"lr": torch.rand(2, 3, 8, 8, generator=g), "hr": torch.rand(2, 3, 32, 32, generator=g)}
    loss = task.compute_loss(model, batch, torch.Generator().manual_seed(1))
    again = task.compute_loss(model, batch, torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, loss, rtol=0, atol=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(2):
        loss = task.compute_loss(model, batch, torch.Generator().manual_seed(step))
        assert torch.isfinite(loss) and loss.item() > 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for name, module in frozen.items():
        assert all(p.grad is None and not p.requires_grad for p in module.parameters()), name
        after = _state(module)
        assert all(torch.equal(before[name][k], after[k]) for k in after), f"{name} changed"
    changed = [k for k, v in _state(model).items() if not torch.equal(v, trained_before[k])]
    assert sorted(changed) == sorted(k for k, _ in model.named_parameters())  # every fusion-layer weight trained


def test_the_trained_cfw_decodes_held_out_crops_more_faithfully(tmp_path, base):
    """On the tiny random SD VAE with ``latents: hr``: trained on random 32px crops of one part of a real photo, the
    CFW at ``w = 1`` decodes unseen crops of another part with a lower L1 to the HR than at initialisation and than
    the plain decoder (``w = 0``): it learns to use the LR image's encoder features. (A random decoder's GroupNorms fix
    each output's statistics, so neither gets close to the HR; the test is about the CFW's gain.)
    Observed: L1 0.409 -> 0.346 after 60 steps (plain decoder: 0.416)."""
    from skimage import data

    from sr_diffusion.resize import imresize

    config = tiny_config(tmp_path, f"cfw.base={base}")
    task = StableSRCFWTask()
    task.check_config(config)
    torch.manual_seed(0)
    model = task.build_model(config)
    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255.0
    train_part, held_out = photo[:, :256, :256], photo[:, 256:, 256:]

    def crops(image: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        ys = torch.randint(0, image.shape[1] - 32 + 1, (n,), generator=g).tolist()
        xs = torch.randint(0, image.shape[2] - 32 + 1, (n,), generator=g).tolist()
        return torch.stack([image[:, y : y + 32, x : x + 32] for y, x in zip(ys, xs)])

    held_hr = crops(held_out, 8, torch.Generator().manual_seed(5))
    held_lr = imresize(held_hr, scale=0.25).clamp(0, 1)

    def held_out_l1(weight: float) -> float:
        model.eval()
        out = task.decode(model, held_lr, held_hr, torch.Generator().manual_seed(0), weight)
        model.train()
        return float((out - held_hr).abs().mean())

    plain, initial = held_out_l1(0.0), held_out_l1(1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3, betas=(0.5, 0.9))
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        hr = crops(train_part, 4, g)
        lr = imresize(hr, scale=0.25).clamp(0, 1)
        loss = task.compute_loss(model, {"lr": lr, "hr": hr}, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = held_out_l1(1.0)
    print(f"held-out L1 at w=1: {initial:.4f} -> {final:.4f} (plain decoder, w=0: {plain:.4f})")
    assert held_out_l1(0.0) == plain  # the plain decoder is untouched
    assert final < 0.9 * initial and final < 0.9 * plain, (initial, final, plain)


def test_trainer_exports_the_cfw_layers_without_a_pipeline(tmp_path, base):
    from sr_diffusion.models import StableSRCFW
    from sr_diffusion.training import Trainer

    config = tiny_config(tmp_path, f"cfw.base={base}", "train.max_steps=2", "train.report_to=none")
    result = Trainer(config, StableSRCFWTask()).train()
    assert len(result.losses) == 2 and (result.output_dir / "checkpoint-2" / "model" / "config.json").is_file()
    cfw = StableSRCFW.from_pretrained(result.pipeline_dir)
    assert list(cfw.config.block_out_channels) == [32, 32, 64] and cfw.config.num_fuse_block == 1


def test_resumed_run_with_generated_latents_ends_with_the_same_weights(tmp_path, first_stage):
    """Exact resume (the shared trainer's promise) holds for the generated latents: every draw of the latent sampler
    comes from the trainer's generator. The export is then the first stage's pipeline with the new CFW layers."""
    from sr_diffusion.pipelines import StableSRPipeline
    from sr_diffusion.training import Trainer

    common = [f"cfw.pipeline={first_stage}", "cfw.latents=generated", "cfw.num_inference_steps=2",
              "train.report_to=none", "train.checkpointing_steps=1", "train.validation_steps=0"]  # fmt: skip

    def run(folder: str, *overrides: str):
        config = tiny_config(tmp_path / folder, *common, *overrides)
        return Trainer(config, StableSRCFWTask()).train()

    straight = run("a", "train.max_steps=2")
    run("b", "train.max_steps=1")
    resumed = run("b", "train.max_steps=2", "train.resume_from_checkpoint=latest")
    assert resumed.resumed_from is not None and resumed.losses == straight.losses[1:]
    pipes = [StableSRPipeline.from_pretrained(r.pipeline_dir) for r in (straight, resumed)]
    for name, param in pipes[0].cfw.state_dict().items():
        torch.testing.assert_close(pipes[1].cfw.state_dict()[name], param, rtol=0, atol=0)
    # the first stage is exported as it was
    first = StableSRPipeline.from_pretrained(first_stage)
    torch.testing.assert_close(pipes[0].unet.state_dict(), first.unet.state_dict(), rtol=0, atol=0)


@pytest.mark.slow
def test_accelerate_launch_writes_the_pipeline_with_its_trained_cfw(tmp_path, first_stage):
    from sr_diffusion.models import StableSRCFW
    from sr_diffusion.pipelines import AutoSRPipeline, StableSRPipeline

    out = tmp_path / "run"
    args = [
        "--stage", "cfw", "--config", str(TINY), f"cfw.pipeline={first_stage}", "cfw.latents=generated",
        "cfw.num_inference_steps=2", f"train.output_dir={out}", "train.max_steps=2", "train.validation_steps=2",
        "validation.source=skimage_sklearn", "train.report_to=none",
    ]  # fmt: skip
    proc = accelerate_launch(SCRIPT, args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoint-2" / "model" / "config.json").is_file()
    assert "PSNR" in proc.stdout + proc.stderr  # validation sampled with the first stage and the CFW

    cfw = StableSRCFW.from_pretrained(out / "pipeline" / "cfw")
    assert list(cfw.config.block_out_channels) == [32, 32, 64]
    pipe = AutoSRPipeline.from_pretrained(out / "pipeline")
    assert isinstance(pipe, StableSRPipeline) and isinstance(pipe.cfw, StableSRCFW) and pipe.upscale == 4
    for name, param in pipe.cfw.state_dict().items():
        torch.testing.assert_close(param, cfw.state_dict()[name], rtol=0, atol=0)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(torch.rand(1, 3, 8, 8), num_inference_steps=2, fidelity_weight=1.0, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
