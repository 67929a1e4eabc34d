"""The LoRA option of the add-on methods' training (``{stablesr,pasd,seesr}.unet_lora_rank``), on PASD (tiny base):
only the add-ons and the LoRA learn, the base UNet stays bit-identical while the LoRA's B matrices move, the add-on
model (checkpoint, EMA copy) carries the LoRA, the exported pipeline's UNet is the base with the LoRA fused in, and the
``unet_lora/`` written beside it loads with ``load_lora_weights`` onto a pipeline of the base with the same output;
a Trainer run writes both. StableSR and SeeSR: the LoRA trains on a frozen base and is fused into the exported UNet."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from pasd_tiny import lr_image, tiny_components
from stablesr_tiny import save_sd_base

from sr_diffusion.models import UNetLoRA
from sr_diffusion.pipelines import PASDPipeline
from sr_diffusion.pipelines.pasd import pasd_noise_pred
from sr_diffusion.training import ConfigError, Trainer, load_config
from sr_diffusion.training.ema import copy_with_ema_weights
from sr_diffusion.training.pasd import PASDAddOns, PASDConfig, PASDExperimentConfig, PASDTask
from sr_diffusion.training.seesr import SeeSRConfig
from sr_diffusion.training.stablesr import StableSRConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pasd_tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_sd_base(tiny_components(), tmp_path_factory.mktemp("sd_base"))


def ready_task(tmp_path, base, *overrides: str) -> tuple[PASDTask, PASDExperimentConfig]:
    args = [f"pasd.base={base}", f"train.output_dir={tmp_path / 'run'}", *overrides]
    config = load_config(TINY, args, cls=PASDExperimentConfig)
    config.validate()
    task = PASDTask()
    task.check_config(config)
    return task, config


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lr": torch.rand(2, 3, 8, 8, generator=g), "hr": torch.rand(2, 3, 32, 32, generator=g)}


def test_the_option_is_shared_and_checked(tmp_path, base):
    for section in (StableSRConfig(), PASDConfig(), SeeSRConfig()):
        assert section.unet_lora_rank is None and section.unet_lora_alpha is None  # off by default: the papers'
    task, config = ready_task(tmp_path, base)
    plain = task.build_model(config)
    assert plain.unet_lora is None and plain.config.unet_lora_config is None
    with pytest.raises(ConfigError, match="pasd.unet_lora_rank: must be >= 1"):
        ready_task(tmp_path, base, "pasd.unet_lora_rank=0")
    with pytest.raises(ConfigError, match="pasd.unet_lora_alpha: set, but pasd.unet_lora_rank is null"):
        ready_task(tmp_path, base, "pasd.unet_lora_alpha=4")
    with pytest.raises(ConfigError, match="pasd.unet_lora_alpha: must be > 0"):
        ready_task(tmp_path, base, "pasd.unet_lora_rank=4", "pasd.unet_lora_alpha=0")


def test_lora_trains_with_the_add_ons_on_a_frozen_base_and_exports_fused_and_alone(tmp_path, base):
    task, config = ready_task(tmp_path, base, "pasd.unet_lora_rank=4", "pasd.unet_lora_alpha=8")
    torch.manual_seed(0)
    model = task.build_model(config)
    assert isinstance(model.unet_lora, UNetLoRA) and model.unet_lora.scale == 2.0
    assert model.config.unet_lora_config["rank"] == 4 and len(model.unet_lora.paths) == 32
    unet = task.base()["unet"]
    before = {k: v.clone() for k, v in unet.state_dict().items()}

    # a few optimizer steps of PASD's own objective
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(3):
        optimizer.zero_grad()
        task.compute_loss(model, batch(step), torch.Generator().manual_seed(step)).backward()
        if step == 0:
            assert all(p.grad is None for p in unet.parameters())  # the base gets no gradient
            assert all(p.grad is not None for p in model.pixel_attentions.parameters())
            assert all(layer.lora_B.weight.grad.abs().sum() > 0 for layer in model.unet_lora.layers)
        optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # bit-identical base
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in model.unet_lora.layers)  # B moved off zero
    assert all(not m._forward_hooks for m in unet.modules())  # hooks only inside forward

    # the model's config rebuilds the LoRA: checkpoints (save/from_pretrained) and the EMA copy carry it
    model.save_pretrained(tmp_path / "model")
    for clone in (PASDAddOns.from_pretrained(tmp_path / "model"), copy_with_ema_weights(model, None)):
        assert clone.unet_lora.paths == model.unet_lora.paths
        for key, value in model.state_dict().items():
            torch.testing.assert_close(clone.state_dict()[key], value, rtol=0, atol=0)

    # the exported pipeline: a copy of the base UNet with W + (alpha / r) B A
    model.eval()
    pipe = task.build_pipeline(model)
    assert pipe.unet is not unet
    layers = dict(zip(model.unet_lora.paths, model.unet_lora.layers))
    base_modules, fused_modules = dict(unet.named_modules()), dict(pipe.unet.named_modules())
    for name, value in pipe.unet.state_dict().items():
        path = name.removesuffix(".weight")
        if path in layers:
            delta = 2.0 * layers[path].lora_B.weight @ layers[path].lora_A.weight
            torch.testing.assert_close(value, base_modules[path].weight + delta, rtol=1e-6, atol=1e-6)
            assert (value - base_modules[path].weight).abs().max() > 0
        else:
            torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert set(layers) <= set(fused_modules)

    # the LoRA alone: load_lora_weights onto a pipeline of the (unchanged) base gives the hooked output
    task.export_extras(model, tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()
    parts = task.base()
    on_base = PASDPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=copy.deepcopy(unet),
        scheduler=task.sampling_scheduler(),
        controlnet=model.controlnet,
        pixel_attentions=model.pixel_attentions,
        upscale=4,
    )
    on_base.load_lora_weights(tmp_path / "pipeline" / "unet_lora")
    g = torch.Generator().manual_seed(5)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    text, cond = task.empty_prompt(torch.device("cpu")).expand(2, -1, -1), torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        hooked = model(unet, z, t, text, cond)[0]
        loaded = pasd_noise_pred(
            on_base.unet,
            controlnet=model.controlnet,
            pixel_attentions=model.pixel_attentions,
            sample=z,
            timestep=t,
            encoder_hidden_states=text,
            cond_image=cond,
        )[0]
        plain = pasd_noise_pred(
            unet,
            controlnet=model.controlnet,
            pixel_attentions=model.pixel_attentions,
            sample=z,
            timestep=t,
            encoder_hidden_states=text,
            cond_image=cond,
        )[0]
    torch.testing.assert_close(loaded, hooked, rtol=1e-4, atol=1e-4)
    assert (hooked - plain).abs().max() > 1e-4  # the LoRA matters

    for p in (pipe, on_base):
        p.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "guidance_scale": 1.0, "output_type": "pt"}
    fused_out = pipe(lr_image(0), generator=torch.Generator().manual_seed(0), **kwargs).images
    loaded_out = on_base(lr_image(0), generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(loaded_out, fused_out, rtol=1e-4, atol=1e-4)


def test_a_trainer_run_exports_the_fused_pipeline_and_the_lora(tmp_path, base, fresh_accelerate_state):
    overrides = [
        "pasd.unet_lora_rank=2",
        "train.max_steps=2",
        "train.validation_steps=0",
        "train.checkpointing_steps=2",
        "train.report_to=none",
        "validation.source=none",
    ]
    task, config = ready_task(tmp_path, base, *overrides)
    result = Trainer(config, task).train()
    unet_lora_dir = result.pipeline_dir / "unet_lora"
    assert (unet_lora_dir / "pytorch_lora_weights.safetensors").is_file()
    checkpoint = PASDAddOns.from_pretrained(result.output_dir / "checkpoint-2" / "model")
    assert checkpoint.unet_lora is not None and checkpoint.config.unet_lora_config["rank"] == 2

    pipe = PASDPipeline.from_pretrained(result.pipeline_dir)
    base_unet = task.base()["unet"]
    ema = PASDAddOns.from_pretrained(result.output_dir / "checkpoint-2" / "ema")
    expected = ema.unet_lora.fuse_into(copy.deepcopy(base_unet))
    for key, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(value, expected.state_dict()[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["stablesr", "seesr"])
def test_the_other_methods_train_the_lora_on_a_frozen_base(tmp_path, base, method):
    from sr_diffusion.training.seesr import SeeSRExperimentConfig, SeeSRTask
    from sr_diffusion.training.stablesr import StableSRExperimentConfig, StableSRTask

    cls, task_cls = {"stablesr": (StableSRExperimentConfig, StableSRTask), "seesr": (SeeSRExperimentConfig, SeeSRTask)}[
        method
    ]
    args = [f"{method}.base={base}", f"train.output_dir={tmp_path / 'run'}", f"{method}.unet_lora_rank=2"]
    config = load_config(REPO / "configs" / f"{method}_tiny.yaml", args, cls=cls)
    config.validate()
    task = task_cls()
    task.check_config(config)
    torch.manual_seed(0)
    model = task.build_model(config)
    unet = task.base()["unet"]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(2):
        optimizer.zero_grad()
        task.compute_loss(model, batch(step), torch.Generator().manual_seed(step)).backward()
        assert all(p.grad is None for p in unet.parameters())
        assert all(layer.lora_B.weight.grad.abs().sum() > 0 for layer in model.unet_lora.layers)
        optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    layer = model.unet_lora.layers[0]
    path = model.unet_lora.paths[0]
    fused = dict(task.build_pipeline(model.eval()).unet.named_modules())[path].weight
    expected = dict(unet.named_modules())[path].weight + layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
    assert (fused - dict(unet.named_modules())[path].weight).abs().max() > 0
