"""Autoencoder training for the latent methods: config, the loss terms (checked by hand), a learning test on real
photo crops, and the script under ``accelerate launch`` writing a ``VQModel.from_pretrained`` folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import accelerate_launch

from sr_diffusion.training import ConfigError, load_config
from sr_diffusion.training.autoencoder import (
    VQ_F4_DEFAULTS,
    AutoencoderExperimentConfig,
    AutoencoderTask,
    _model_kwargs,
    autoencoder_loss,
    build_autoencoder,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "autoencoder_tiny.yaml"
SCRIPT = REPO / "training" / "train_autoencoder.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)

# replaces the whole (VQ) model section of the tiny config
KL_OVERRIDES = (
    "model={arch: kl, block_out_channels: [8, 16], norm_num_groups: 8, latent_channels: 4, layers_per_block: 1,"
    " mid_block_add_attention: false}",
)


def tiny_config(tmp_path, *overrides: str) -> AutoencoderExperimentConfig:
    return load_config(TINY, [f"train.output_dir={tmp_path / 'run'}", *overrides], cls=AutoencoderExperimentConfig)


def test_config_defaults_and_checks(tmp_path):
    from diffusers import AutoencoderKL, VQModel

    model = build_autoencoder(tiny_config(tmp_path))
    assert isinstance(model, VQModel) and model.config.sample_size == 32
    assert list(model.config.down_block_types) == ["DownEncoderBlock2D"] * 3  # f4: two downsamplings
    # the default model section is the released VQ-f4 layout (what convert_vq_f4 infers from autoencoder_vq_f4.pth)
    default = load_config(None, cls=AutoencoderExperimentConfig, overrides=["model.arch=vq", "validation.source=none"])
    task = AutoencoderTask()
    task.check_config(default)
    cls, kwargs = _model_kwargs(default)
    assert cls is VQModel and all(kwargs[k] == v for k, v in VQ_F4_DEFAULTS.items())
    assert kwargs["block_out_channels"] == [128, 256, 512] and kwargs["num_vq_embeddings"] == 8192
    assert isinstance(build_autoencoder(tiny_config(tmp_path, *KL_OVERRIDES)), AutoencoderKL)

    for overrides, message in [
        (["validation.source=skimage_sklearn"], "validation.source: must be 'none'"),
        (["autoencoder.kl_weight=-1"], "autoencoder.kl_weight"),
        (["autoencoder.vq_weights=1"], "unknown config key.*autoencoder.vq_weights"),
    ]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, *overrides)
    for overrides, message in [
        (["model.arch=edsr"], "unknown autoencoder 'edsr'"),
        (["model.num_feat=8"], "unknown config key.*model.num_feat"),
    ]:
        with pytest.raises(ConfigError, match=message):
            task.check_config(tiny_config(tmp_path, *overrides))
    with pytest.raises(ConfigError, match="multiple of the downsampling factor 4"):
        build_autoencoder(tiny_config(tmp_path, "scale=2", "data.gt_size=34"))


def _x(seed=0, n=2, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vq_loss_is_l1_plus_commitment(tmp_path):
    torch.manual_seed(0)
    model = build_autoencoder(tiny_config(tmp_path))
    x = _x()
    terms = autoencoder_loss(model, x, vq_weight=0.7)

    # by hand: nearest codebook vector of every latent, the straight-through decode
    z = model.quant_conv(model.encoder(x))
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    codebook = model.quantize.embedding.weight
    z_q = codebook[torch.cdist(flat, codebook).argmin(1)].view(z.shape[0], z.shape[2], z.shape[3], -1)
    z_q = z_q.permute(0, 3, 1, 2)
    commit = (1 + 0.25) * (z_q - z).pow(2).mean()  # mean(sg[z_q]-z)^2 + beta mean(z_q-sg[z])^2, same value
    rec = (model.decoder(model.post_quant_conv(z_q)) - x).abs().mean()
    torch.testing.assert_close(terms["reg"], commit, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["rec"], rec, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"], rec + 0.7 * commit, rtol=1e-5, atol=1e-6)

    # the task's loss (batch in [0, 1]) is the same; it trains the encoder, the codebook and the decoder
    task = AutoencoderTask()
    task.check_config(tiny_config(tmp_path, "autoencoder.vq_weight=0.7"))
    loss = task.compute_loss(model, {"hr": (x + 1) / 2, "lr": x[..., ::4, ::4]}, torch.Generator())
    torch.testing.assert_close(loss, terms["loss"], rtol=1e-5, atol=1e-6)
    loss.backward()
    for module in (model.encoder.conv_in, model.quantize.embedding, model.decoder.conv_out):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_kl_loss_is_l1_plus_weighted_kl(tmp_path):
    torch.manual_seed(0)
    model = build_autoencoder(tiny_config(tmp_path, *KL_OVERRIDES))
    x = _x(1)
    terms = autoencoder_loss(model, x, torch.Generator().manual_seed(3), kl_weight=0.01)

    mean, logvar = model.quant_conv(model.encoder(x)).chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=[1, 2, 3]).mean()
    rec = (model.decoder(model.post_quant_conv(z)) - x).abs().mean()
    torch.testing.assert_close(terms["reg"], kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["rec"], rec, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"], rec + 0.01 * kl, rtol=1e-5, atol=1e-6)
    # the posterior sample comes from the generator: same seed, same loss; another seed, another
    again = autoencoder_loss(model, x, torch.Generator().manual_seed(3), kl_weight=0.01)["loss"]
    other = autoencoder_loss(model, x, torch.Generator().manual_seed(4), kl_weight=0.01)["loss"]
    assert torch.equal(again, terms["loss"]) and not torch.equal(other, terms["loss"])


def test_a_tiny_vq_model_learns_to_reconstruct_held_out_crops(tmp_path, photo_tensor):
    """The tiny VQ-f4-layout model of the config, trained on random 32px crops of the left part of a real photo,
    reconstructs unseen crops of its right part far better than at initialisation, and better than their mean
    colour (it encodes structure, not just colour). Observed: L1 0.284 -> 0.163 (mean colour: 0.256)."""
    torch.manual_seed(0)
    task = AutoencoderTask()
    config = tiny_config(tmp_path)
    task.check_config(config)
    model = build_autoencoder(config)
    photo = photo_tensor[0]  # (3, 96, 128) in [0, 1]
    train_part, held_out = photo[:, :, :88], photo[:, :, 96:]
    held_out = torch.stack([held_out[:, y : y + 32] for y in (0, 32, 64)])
    mean_colour_l1 = float((held_out - held_out.mean((2, 3), keepdim=True)).abs().mean())

    def held_out_l1() -> float:
        model.eval()
        error = float((task.reconstruct(model, held_out) - held_out).abs().mean())
        model.train()
        return error

    initial = held_out_l1()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.9))
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        if step == STEPS - ANNEAL_STEPS:  # a short low-LR tail: the end point is less noisy
            optimizer.param_groups[0]["lr"] = 2e-4
        ys = torch.randint(0, 96 - 32 + 1, (4,), generator=g).tolist()
        xs = torch.randint(0, 88 - 32 + 1, (4,), generator=g).tolist()
        hr = torch.stack([train_part[:, y : y + 32, x : x + 32] for y, x in zip(ys, xs)])
        loss = task.compute_loss(model, {"hr": hr}, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = held_out_l1()
    print(f"held-out L1 {initial:.4f} -> {final:.4f} (mean colour {mean_colour_l1:.4f})")
    assert final < 0.7 * initial and final < 0.8 * mean_colour_l1, (initial, final, mean_colour_l1)


STEPS, ANNEAL_STEPS = 150, 30


def test_accelerate_launch_writes_a_loadable_vq_model(tmp_path):
    from diffusers import VQModel

    out = tmp_path / "run"
    proc = accelerate_launch(
        SCRIPT,
        [
            "--config",
            str(TINY),
            "train.max_steps=3",
            "train.checkpointing_steps=3",
            "train.report_to=none",
            f"train.output_dir={out}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoint-3" / "model" / "config.json").is_file() and (out / "config.yaml").is_file()
    vae = VQModel.from_pretrained(out / "pipeline")
    assert list(vae.config.block_out_channels) == [16, 32, 32] and vae.config.scaling_factor == 1.0
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 32, 32) * 2 - 1).latents
        assert latents.shape == (1, 3, 8, 8)  # f4, 3 latent channels: what ResShiftPipeline's vae= expects
        assert vae.decode(latents).sample.shape == (1, 3, 32, 32)
