"""DAPE training: config, the objective (checked term by term), and ``training/train_dape.py`` under accelerate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import accelerate_launch

from sr_diffusion.training import ConfigError, load_config
from sr_diffusion.training.dape import (
    DAPEExperimentConfig,
    DAPELossConfig,
    DAPETask,
    build_dape_model,
    dape_alignment_loss,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "dape_tiny.yaml"
SCRIPT = REPO / "training" / "train_dape.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def tiny_config(tmp_path, *overrides: str) -> DAPEExperimentConfig:
    return load_config(TINY, [f"train.output_dir={tmp_path / 'run'}", *overrides], cls=DAPEExperimentConfig)


def test_config_defaults_and_checks(tmp_path):
    config = tiny_config(tmp_path)
    assert config.model.arch == "dape" and config.model.kwargs["lora_rank"] == 4
    assert config.data.degradation.type == "realesrgan" and config.validation.source == "none"
    full = load_config(REPO / "configs" / "dape_vit_b16.yaml", ["data.hr_dirs=[x]"], cls=DAPEExperimentConfig)
    DAPETask().check_config(full)
    assert full.model.kwargs["model_name"] == "ViT-B-16" and full.optim.milestones == [20000, 30000]
    default = load_config(None, cls=DAPEExperimentConfig)
    assert default.data.degradation.type == "realesrgan" and default.train.ema_decay is None
    assert default.dape == DAPELossConfig() and default.train.output_dir == "outputs/dape"
    for override, message in [
        ("validation.source=skimage_sklearn", "validation.source"),
        ("dape.kl_temperature=0", "dape.kl_temperature"),
        ("dape.cosine_weight=-1", "dape.cosine_weight"),
        ("dape.klweight=1", "unknown config key.*dape.klweight"),
    ]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, override)
    task = DAPETask()
    for override, message in [
        ("model.arch=edsr", "model.arch"),
        ("model.lora_rnk=4", "unknown config key.*model.lora_rnk"),
    ]:
        with pytest.raises(ConfigError, match=message):
            task.check_config(tiny_config(tmp_path, override))


def test_compute_loss_is_the_alignment_objective(tmp_path):
    config = tiny_config(
        tmp_path, "dape.feature_weight=0.5", "dape.cosine_weight=2", "dape.kl_weight=3", "dape.kl_temperature=2"
    )
    task = DAPETask()
    task.check_config(config)
    torch.manual_seed(0)
    model = task.build_model(config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # tower, projector, tag embeddings frozen

    g = torch.Generator().manual_seed(0)
    hr = torch.rand(3, 3, 64, 64, generator=g)
    lr = torch.rand(3, 3, 16, 16, generator=g)
    # a fresh LoRA is a no-op: the same image for student and teacher gives a zero loss
    assert task.compute_loss(model, {"lr": hr, "hr": hr}, g).abs() < 1e-5

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=g)
    loss = task.compute_loss(model, {"lr": lr, "hr": hr}, g)
    with torch.no_grad():
        t = model(hr, use_lora=False, return_prompts=False)
        s = model(lr, return_prompts=False)
    feature = F.mse_loss(s.image_tokens, t.image_tokens) + F.mse_loss(s.image_embeds, t.image_embeds)
    cosine = 1 - F.cosine_similarity(s.image_embeds, t.image_embeds).mean()
    p_t = F.softmax(t.tag_logits / 2, dim=-1)
    kl = (p_t * (p_t.log() - F.log_softmax(s.tag_logits / 2, dim=-1))).sum(-1).mean() * 4
    terms = dape_alignment_loss(s, t, config.dape)
    torch.testing.assert_close(terms["feature"], feature)
    torch.testing.assert_close(terms["cosine"], cosine)
    torch.testing.assert_close(terms["kl"], kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.detach(), 0.5 * feature + 2 * cosine + 3 * kl, rtol=1e-5, atol=1e-6)
    assert feature > 0 and cosine > 0 and kl > 0

    loss.backward()  # gradients reach the LoRA weights only
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    with pytest.raises(NotImplementedError):
        task.predict(model, lr[:1], g)
    assert task.build_pipeline(model) is model


def test_parameter_order_is_stable_for_the_ema(tmp_path):
    """peft re-registers directly targeted weights at each forward; the trainer's EMA (and its copy into a model built
    from the config) pairs parameters by position, so the order must be the same before and after a forward."""
    from sr_diffusion.training.ema import copy_with_ema_weights, create_ema

    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    model = build_dape_model(config)
    ema = create_ema(model, 0.9)
    before = [name for name, _ in model.named_parameters()]
    model(torch.rand(2, 3, 64, 64), return_prompts=False).image_embeds.sum().backward()
    assert [name for name, _ in model.named_parameters()] == before
    ema.step(model.parameters())
    clone = copy_with_ema_weights(model, ema)
    assert [name for name, _ in clone.named_parameters()] == before
    assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), model.state_dict().values()))


@pytest.mark.slow
def test_accelerate_launch_writes_a_loadable_dape(tmp_path):
    from sr_diffusion.prompts import DAPE

    out = tmp_path / "run"
    args = [
        "--config",
        str(TINY),
        "train.max_steps=4",
        "train.checkpointing_steps=2",
        "train.report_to=none",
        "data.batch_size=4",
        f"train.output_dir={out}",
    ]
    proc = accelerate_launch(SCRIPT, args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "config.yaml").is_file()
    assert all((out / f"checkpoint-{step}" / "model" / "config.json").is_file() for step in (2, 4))

    dape = DAPE.from_pretrained(out / "pipeline")
    checkpoint = DAPE.from_pretrained(out / "checkpoint-4" / "model")
    lora = dape.lora_state_dict()
    assert all(torch.equal(v, checkpoint.lora_state_dict()[k]) for k, v in lora.items())
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # it trained
    with torch.no_grad():
        out = dape(torch.rand(2, 3, 40, 56))
    assert len(out.hard_prompts) == 2 and all(len(t) == 5 for t in out.tags)
    assert out.soft_prompts.shape == (2, 65, 64)
