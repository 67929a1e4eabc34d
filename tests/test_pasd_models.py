"""PASD's models: the ControlNet with the degradation-removal module and the pixel-aware cross-attention add-on load the
released parameter names and config keys (written from the original architecture in tests/pasd_tiny.py) with no
missing or unexpected key, and compute what the original computes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel
from pasd_tiny import (
    COND_CHANNELS,
    original_condition_embedding_shapes,
    original_controlnet_config,
    original_pixel_attention_shapes,
    perturb,
    tiny_controlnet,
)
from safetensors.torch import save_file
from stablesr_tiny import TEXT_DIM, random_state_dict, tiny_unet

from sr_diffusion.models import PASDControlNetModel
from sr_diffusion.models.block_attention import BlockAttentions
from sr_diffusion.models.pasd_controlnet import PASDControlNetOutput

pytestmark = pytest.mark.usefixtures("one_thread")


def sd_like_unet(linear: bool = False) -> UNet2DConditionModel:
    """SD 1.5's block layout (3 cross-attention levels and a plain one, 2 layers per block) at tiny widths."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
        use_linear_projection=linear,
    )


# ----------------------------------------------------------------------------------------------------------------------
# released layouts
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rrdb", [False, True])
def test_a_released_controlnet_folder_loads_with_every_key(tmp_path, use_rrdb):
    unet = tiny_unet()
    config = original_controlnet_config(unet, use_rrdb=use_rrdb)
    # the original's ControlNet is diffusers' apart from the condition encoder: its other keys are the stock model's
    stock_config = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("return_rgbs", "use_rrdb")}
    stock = ControlNetModel(**stock_config)
    shapes = {k: tuple(v.shape) for k, v in stock.state_dict().items() if not k.startswith("controlnet_cond_embedding")}
    shapes |= original_condition_embedding_shapes(use_rrdb=use_rrdb)
    weights = random_state_dict(shapes, seed=7)
    (tmp_path / "controlnet").mkdir()
    (tmp_path / "controlnet" / "config.json").write_text(json.dumps(config))
    save_file(weights, tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors")

    model, info = PASDControlNetModel.from_pretrained(tmp_path, subfolder="controlnet", output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert set(model.state_dict()) == set(weights)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert model.config.use_rrdb is use_rrdb and model.config.return_rgbs is True


@pytest.mark.parametrize("linear", [False, True])
def test_pixel_attentions_have_the_released_names_and_shapes_for_an_sd_layout(linear):
    unet = sd_like_unet(linear)
    extra = BlockAttentions.pasd_pixel_attentions(unet)
    expected = original_pixel_attention_shapes(
        widths=(32, 32, 64, 64), up_cross_attention=(False, True, True, True), layers_per_block=2, linear=linear
    )
    assert {k: tuple(v.shape) for k, v in extra.state_dict().items()} == expected
    result = extra.load_state_dict(random_state_dict(expected, seed=3), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # 12 layers, matched with the 12 skips of the UNet: the first layer takes the last skip
    assert len(extra.positions) == 12 and extra.positions[0] == "up_blocks.0.pixel_attentions.0"
    extra.check_model(unet)


def test_pixel_attentions_of_the_tiny_unet_match_the_original_layout():
    extra = BlockAttentions.pasd_pixel_attentions(tiny_unet())
    assert {k: tuple(v.shape) for k, v in extra.state_dict().items()} == original_pixel_attention_shapes()


# ----------------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------------


def reference_embedding(module, cond: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The original ``ControlNetConditioningEmbedding.forward`` written out with functional convolutions."""
    h = F.silu(F.conv2d(cond, module.conv_in.weight, module.conv_in.bias, padding=1))
    if module.use_rrdb:
        h = module.preprocesser(h)
    rgbs = []
    for k in range(len(module.blocks) // 2):
        a, b = module.blocks[2 * k], module.blocks[2 * k + 1]
        h = F.silu(F.conv2d(h, a.weight, a.bias, padding=1))
        h = F.silu(F.conv2d(h, b.weight, b.bias, padding=1, stride=2))
        rgbs.append(F.conv2d(h, module.to_rgbs[k].weight, module.to_rgbs[k].bias, padding=1))
    return F.conv2d(h, module.conv_out.weight, module.conv_out.bias, padding=1), rgbs


@pytest.mark.parametrize("use_rrdb", [False, True])
def test_forward_returns_residuals_and_multi_scale_rgbs(use_rrdb):
    controlnet = tiny_controlnet(use_rrdb=use_rrdb)
    g = torch.Generator().manual_seed(0)
    sample, text, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, TEXT_DIM, generator=g), None
    cond = torch.rand(2, 3, 32, 32, generator=g)  # 4 × the latent: the tiny VAE's factor
    with torch.no_grad():
        out = controlnet(sample, 10, text, cond)
        features, rgbs = reference_embedding(controlnet.controlnet_cond_embedding, cond)
    assert isinstance(out, PASDControlNetOutput)
    assert [tuple(r.shape) for r in out.rgbs] == [(2, 3, 16, 16), (2, 3, 8, 8)]  # H/2, H/4 (SD: also H/8)
    for got, want in zip(out.rgbs, rgbs):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(controlnet.controlnet_cond_embedding(cond), features)
    assert [tuple(d.shape) for d in out.down_block_res_samples] == [
        (2, 32, 8, 8),
        (2, 32, 8, 8),
        (2, 32, 4, 4),
        (2, 64, 4, 4),
    ]
    # the tuple form: (down, mid, rgbs); the conditioning scale scales the residuals, not the RGB outputs
    with torch.no_grad():
        down, mid, rgbs_half = controlnet(sample, 10, text, cond, conditioning_scale=0.5, return_dict=False)
    torch.testing.assert_close(mid, out.mid_block_res_sample * 0.5)
    torch.testing.assert_close(down[-1], out.down_block_res_samples[-1] * 0.5)
    torch.testing.assert_close(rgbs_half[0], out.rgbs[0])
    # the hooks are gone after the call; without return_rgbs there are no RGB outputs
    assert all(not conv._forward_hooks for conv in controlnet.controlnet_cond_embedding.to_rgbs)


def test_without_rgbs_the_residuals_are_the_same_and_no_to_rgbs_exist():
    with_rgbs = tiny_controlnet()
    without = PASDControlNetModel.from_config(with_rgbs.config, return_rgbs=False)
    missing, unexpected = without.load_state_dict(with_rgbs.state_dict(), strict=False)
    assert not missing and all(".to_rgbs." in k for k in unexpected) and unexpected
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 4, 8, 8, generator=g), 3, torch.randn(1, 5, TEXT_DIM, generator=g))
    cond = torch.rand(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        a, b = with_rgbs(*args, cond), without(*args, cond)
    assert b.rgbs is None
    torch.testing.assert_close(a.mid_block_res_sample, b.mid_block_res_sample)


def test_from_unet_copies_the_encoder_and_zero_initialises_the_outputs():
    unet = tiny_unet()
    controlnet = PASDControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CHANNELS, use_rrdb=True)
    assert controlnet.config.use_rrdb and controlnet.controlnet_cond_embedding.use_rrdb
    assert torch.equal(controlnet.down_blocks[1].resnets[0].conv1.weight, unet.down_blocks[1].resnets[0].conv1.weight)
    emb = controlnet.controlnet_cond_embedding
    assert emb.conv_out.weight.abs().max() == 0 and controlnet.controlnet_mid_block.weight.abs().max() == 0
    # zero-initialised: no effect on the UNet, but the RGB outputs are live (the degradation-removal loss trains them)
    out = controlnet(torch.randn(1, 4, 8, 8), 5, torch.randn(1, 5, TEXT_DIM), torch.rand(1, 3, 32, 32))
    assert all(d.abs().max() == 0 for d in out.down_block_res_samples)
    loss = sum(F.l1_loss(r, torch.zeros_like(r)) for r in out.rgbs)
    loss.backward()
    assert emb.to_rgbs[0].weight.grad.abs().max() > 0 and emb.conv_in.weight.grad.abs().max() > 0


def test_save_load_round_trip(tmp_path):
    controlnet = perturb(tiny_controlnet(use_rrdb=True), seed=5)
    controlnet.save_pretrained(tmp_path)
    loaded = PASDControlNetModel.from_pretrained(tmp_path)
    public = [
        {k: v for k, v in json.loads(m.to_json_string()).items() if k != "_name_or_path"} for m in (loaded, controlnet)
    ]
    assert public[0] == public[1] and loaded.config.use_rrdb
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in controlnet.state_dict().items())
