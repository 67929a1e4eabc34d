"""Converting StableSR's released checkpoints: random state dicts with the original (LDM / Lightning) parameter names
and shapes (tests/stablesr_tiny.py writes them from the original architectures) convert into a StableSRPipeline with no
missing or unexpected key, each part lands where it belongs, the CLI does the same, and bad files are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from stablesr_tiny import (
    ldm_cfw_shapes,
    ldm_encoder_shapes,
    ldm_unet_shapes,
    ldm_vae_shapes,
    lr_image,
    random_state_dict,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)

from sr_diffusion.checkpoints import CheckpointError
from sr_diffusion.cli import main
from sr_diffusion.conversion.stablesr import convert_stablesr, read_stablesr_checkpoint
from sr_diffusion.pipelines import AutoSRPipeline, StableSRPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def write_base(folder, text_dim: int = 32):
    """A tiny SD 2.x-like diffusers folder (linear transformer projections, as SD 2.1)."""
    tiny_unet(cross_attention_dim=text_dim, use_linear_projection=True).save_pretrained(folder / "unet")
    tiny_vae().save_pretrained(folder / "vae")
    tiny_text_encoder(text_dim).save_pretrained(folder / "text_encoder")
    tiny_tokenizer().save_pretrained(folder / "tokenizer")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        folder / "scheduler"
    )
    return folder


def stablesr_state_dict() -> dict[str, torch.Tensor]:
    """``LatentDiffusionSRTextWT.state_dict()`` of a tiny model: UNet with SFT, time-aware encoder, VAE, text encoder
    (dropped by the converter) and schedule buffers."""
    sd = random_state_dict(ldm_unet_shapes(linear=True), "model.diffusion_model.", seed=1)
    sd |= random_state_dict(ldm_encoder_shapes(), "structcond_stage_model.", seed=2)
    sd |= random_state_dict(ldm_vae_shapes(), "first_stage_model.", seed=3)
    sd |= {"cond_stage_model.model.token_embedding.weight": torch.zeros(10, 32), "betas": torch.rand(1000)}
    return sd


def cfw_state_dict() -> dict[str, torch.Tensor]:
    """``AutoencoderKLResi.state_dict()``: SD's autoencoder, the CFW layers, and the training loss's weights."""
    sd = random_state_dict(ldm_vae_shapes(), seed=4) | random_state_dict(ldm_cfw_shapes(), seed=5)
    return sd | {"loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4), "loss.logvar": torch.zeros(())}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stablesr_files")
    base = write_base(root / "base")
    main_sd, cfw_sd = stablesr_state_dict(), cfw_state_dict()
    # Lightning checkpoints also hold plain values, and sometimes numpy scalars (allowed explicitly)
    torch.save({"state_dict": main_sd, "global_step": np.int64(117), "epoch": 3}, root / "stablesr.ckpt")
    torch.save({"state_dict": cfw_sd, "global_step": 11}, root / "vqgan_cfw.ckpt")
    return {"root": root, "base": base, "main": main_sd, "cfw": cfw_sd}


def test_released_layout_converts_with_every_key_in_place(files, tmp_path):
    pipe = convert_stablesr(files["root"] / "stablesr.ckpt", files["base"], files["root"] / "vqgan_cfw.ckpt")
    main_sd, cfw_sd = files["main"], files["cfw"]
    # the add-ons keep the original names: exact copies
    for name, value in pipe.time_aware_encoder.state_dict().items():
        torch.testing.assert_close(value, main_sd["structcond_stage_model." + name], rtol=0, atol=0)
    for name, value in pipe.sft.state_dict().items():
        torch.testing.assert_close(value, main_sd["model.diffusion_model." + name], rtol=0, atol=0)
    for name, value in pipe.cfw.state_dict().items():
        torch.testing.assert_close(value, cfw_sd["decoder." + name], rtol=0, atol=0)
    assert len(pipe.sft.state_dict()) == sum(".spade." in k for k in main_sd)
    # the SD base parts went through diffusers' conversion: spot checks, and nothing missing (strict loading)
    unet = pipe.unet.state_dict()
    torch.testing.assert_close(unet["conv_in.weight"], main_sd["model.diffusion_model.input_blocks.0.0.weight"])
    torch.testing.assert_close(
        unet["up_blocks.0.resnets.1.conv2.weight"],
        main_sd["model.diffusion_model.output_blocks.1.0.out_layers.3.weight"],
    )
    assert not any(".spade." in k for k in unet)
    # the autoencoder is the CFW checkpoint's (the original encodes and decodes with it), not first_stage_model's
    vae = pipe.vae.state_dict()
    torch.testing.assert_close(vae["encoder.conv_in.weight"], cfw_sd["encoder.conv_in.weight"])
    torch.testing.assert_close(
        vae["decoder.up_blocks.0.upsamplers.0.conv.weight"], cfw_sd["decoder.up.2.upsample.conv.weight"]
    )
    assert pipe.time_aware_encoder.config.channel_mult == [1, 1]
    assert list(pipe.time_aware_encoder.config.attention_resolutions) == [2]
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.clip_sample is False

    pipe.set_progress_bar_config(disable=True)
    out = pipe(lr_image(0), num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()

    # without the CFW checkpoint: first_stage_model's autoencoder, no CFW
    plain = convert_stablesr(main_sd, files["base"])
    assert plain.cfw is None
    torch.testing.assert_close(
        plain.vae.state_dict()["encoder.conv_in.weight"], main_sd["first_stage_model.encoder.conv_in.weight"]
    )


def test_cli_convert_writes_a_loadable_folder(files, tmp_path, capsys):
    out = tmp_path / "stablesr"
    args = ["convert", str(files["root"] / "stablesr.ckpt"), str(out), "--arch", "stablesr"]
    assert main([*args, "--base", str(files["base"]), "--vae", str(files["root"] / "vqgan_cfw.ckpt")]) == 0
    assert "StableSRPipeline" in capsys.readouterr().out
    pipe = AutoSRPipeline.from_pretrained(out)
    assert type(pipe) is StableSRPipeline and pipe.cfw is not None
    assert main(["convert", str(files["root"] / "stablesr.ckpt"), str(tmp_path / "other"), "--arch", "stablesr"]) == 2
    assert "pass --base" in capsys.readouterr().err
    torch.save({"state_dict": files["main"]}, tmp_path / "plain.ckpt")  # no numpy values: the family is detected
    assert main(["convert", str(tmp_path / "plain.ckpt"), str(tmp_path / "auto"), "--base", str(files["base"])]) == 0
    assert type(AutoSRPipeline.from_pretrained(tmp_path / "auto")) is StableSRPipeline


def test_base_of_another_family_is_refused(files, tmp_path):
    base = write_base(tmp_path / "sd15_like", text_dim=48)  # text and cross-attention width of another family
    with pytest.raises(CheckpointError, match="cross-attends to 32-d text embeddings"):
        convert_stablesr(files["main"], base)
    with pytest.raises(FileNotFoundError, match="not a Stable Diffusion diffusers folder"):
        convert_stablesr(files["main"], tmp_path)


def test_missing_and_unexpected_keys_are_named(files):
    broken = {k: v for k, v in files["main"].items() if k != "model.diffusion_model.middle_block.2.spade.mlp_beta.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys 'middle_block\.2\.spade\.mlp_beta\.bias'"):
        convert_stablesr(broken, files["base"])
    extra = {**files["main"], "structcond_stage_model.extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unexpected keys 'extra.weight'"):
        convert_stablesr(extra, files["base"])
    with pytest.raises(CheckpointError, match="not a StableSR"):
        convert_stablesr(random_state_dict(ldm_vae_shapes(), "first_stage_model."), files["base"])
    with pytest.raises(CheckpointError, match="not a StableSR CFW autoencoder"):
        convert_stablesr(files["main"], files["base"], cfw_checkpoint=random_state_dict(ldm_vae_shapes()))


class NotATensor:
    pass


def test_unsafe_objects_are_refused(tmp_path):
    torch.save({"state_dict": {"a.weight": torch.zeros(1)}, "callback": NotATensor()}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="unsafe unpickling"):
        read_stablesr_checkpoint(tmp_path / "bad.ckpt")
    torch.save({"state_dict": {"a.weight": torch.zeros(1)}, "score": np.float64(0.5)}, tmp_path / "ok.ckpt")
    state_dict, _ = read_stablesr_checkpoint(tmp_path / "ok.ckpt")
    assert list(state_dict) == ["a.weight"]
