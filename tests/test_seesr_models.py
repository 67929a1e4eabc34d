"""SeeSR's model parts: the image cross-attention add-ons have the released names and shapes (written from the original
blocks) and run where the original blocks run them; the ControlNet is diffusers' with SeeSR's layout and is made from
the UNet as the original's ``from_unet``; the shared denoiser call."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel
from seesr_tiny import COND_CHANNELS, IMAGE_DIM, perturb, seesr_image_attention_shapes, soft_prompts
from stablesr_tiny import random_state_dict, tiny_unet

from sr_diffusion.models.seesr import (
    null_image_prompt,
    seesr_controlnet_from_unet,
    seesr_image_attentions,
    seesr_noise_pred,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# an SD 2-like layout, smaller: three levels, two layers per block, linear projections, per-level heads
SD2_LIKE = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
)


def shapes_of(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("layout", ["tiny", "sd2_like"])
def test_image_attentions_have_the_released_names_and_shapes(layout):
    if layout == "tiny":
        unet = tiny_unet()
        expected_unet = seesr_image_attention_shapes()
        expected_controlnet = seesr_image_attention_shapes(up=False)
    else:
        unet = tiny_unet(**SD2_LIKE)
        kwargs = dict(
            widths=(32, 64, 64),
            down_cross_attention=(True, True, False),
            up_cross_attention=(False, True, True),
            layers_per_block=2,
            linear=True,
        )
        expected_unet = seesr_image_attention_shapes(**kwargs)
        expected_controlnet = seesr_image_attention_shapes(**kwargs, up=False)
    extra = seesr_image_attentions(unet, IMAGE_DIM)
    assert shapes_of(extra) == expected_unet
    controlnet, controlnet_extra = seesr_controlnet_from_unet(
        unet, context_dim=IMAGE_DIM, conditioning_embedding_out_channels=COND_CHANNELS
    )
    assert shapes_of(controlnet_extra) == expected_controlnet
    # a state dict of the released layout loads with no missing or unexpected keys
    for module, shapes in ((extra, expected_unet), (controlnet_extra, expected_controlnet)):
        result = module.load_state_dict(random_state_dict(shapes), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
    # heads as the block's text attention (the original passes the same num_attention_heads)
    if layout == "sd2_like":
        layer = extra.up_blocks[2].image_attentions[0]
        assert layer.config.num_attention_heads == unet.up_blocks[2].attentions[0].config.num_attention_heads == 2


def test_the_controlnet_is_diffusers_with_seesrs_layout():
    """The ControlNet-only keys, written from SeeSR's ``models/controlnet.py`` (the conditioning embedding with the
    default (16, 32, 96, 256) channels, a zero 1x1 convolution per down-block output and for the mid block); every other
    key is the UNet's layout (copied from it)."""
    unet = tiny_unet()
    widths, c0 = (32, 64), 32
    cond = (16, 32, 96, 256)
    expected = {
        "controlnet_cond_embedding.conv_in.weight": (cond[0], 3, 3, 3),
        "controlnet_cond_embedding.conv_in.bias": (cond[0],),
        "controlnet_cond_embedding.conv_out.weight": (c0, cond[-1], 3, 3),
        "controlnet_cond_embedding.conv_out.bias": (c0,),
        "controlnet_mid_block.weight": (widths[-1], widths[-1], 1, 1),
        "controlnet_mid_block.bias": (widths[-1],),
    }
    for i in range(len(cond) - 1):
        expected[f"controlnet_cond_embedding.blocks.{2 * i}.weight"] = (cond[i], cond[i], 3, 3)
        expected[f"controlnet_cond_embedding.blocks.{2 * i}.bias"] = (cond[i],)
        expected[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"] = (cond[i + 1], cond[i], 3, 3)
        expected[f"controlnet_cond_embedding.blocks.{2 * i + 1}.bias"] = (cond[i + 1],)
    outputs = [c0] + [w for level, w in enumerate(widths) for _ in range(1 + (level < len(widths) - 1))]
    for k, c in enumerate(outputs):  # conv_in, then per level layers_per_block (1) outputs and the downsampler's
        expected[f"controlnet_down_blocks.{k}.weight"] = (c, c, 1, 1)
        expected[f"controlnet_down_blocks.{k}.bias"] = (c,)
    controlnet, _ = seesr_controlnet_from_unet(unet, context_dim=IMAGE_DIM)
    got = shapes_of(controlnet)
    own = {k: v for k, v in got.items() if k.startswith(("controlnet_", "controlnet_cond"))}
    assert own == expected
    unet_shapes = shapes_of(unet)
    assert all(unet_shapes.get(k) == v for k, v in got.items() if k not in own)  # the rest: the UNet's layout
    assert all(not v.any() for k, v in controlnet.state_dict().items() if k.startswith("controlnet_down_blocks"))


def test_from_unet_copies_the_unets_weights_and_image_attentions():
    unet = tiny_unet()
    torch.manual_seed(3)
    unet_extra = perturb(seesr_image_attentions(unet, IMAGE_DIM), 4)
    controlnet, extra = seesr_controlnet_from_unet(unet, unet_extra, conditioning_embedding_out_channels=COND_CHANNELS)
    unet_state, unet_extra_state = unet.state_dict(), unet_extra.state_dict()
    for key, value in controlnet.state_dict().items():
        if key.startswith(("conv_in", "time_embedding", "down_blocks", "mid_block")):
            assert torch.equal(value, unet_state[key]), key
    for key, value in extra.state_dict().items():
        assert torch.equal(value, unet_extra_state[key]), key
    with pytest.raises(ValueError, match="24-d soft prompts, context_dim=8"):
        seesr_controlnet_from_unet(unet, unet_extra, context_dim=8)


def test_the_image_attention_runs_after_each_text_attention_as_the_original_block():
    """``CrossAttnDownBlock2D`` of SeeSR: ``h = resnet(h); h = attn(h, text); h = image_attn(h, p_soft)`` per layer;
    the hooked diffusers block computes the same."""
    unet = tiny_unet()
    torch.manual_seed(5)
    extra = perturb(seesr_image_attentions(unet, IMAGE_DIM), 6)
    block, layers = unet.down_blocks[1], extra.down_blocks[1].image_attentions
    g = torch.Generator().manual_seed(0)
    h, temb = torch.randn(2, 32, 4, 4, generator=g), torch.randn(2, 128, generator=g)
    text, soft = torch.randn(2, 7, 32, generator=g), soft_prompts(0, batch=2)
    with torch.no_grad():
        expected = h
        for resnet, attn, image_attn in zip(block.resnets, block.attentions, layers):
            expected = resnet(expected, temb)
            expected = attn(expected, encoder_hidden_states=text, return_dict=False)[0]
            expected = image_attn(expected, encoder_hidden_states=soft, return_dict=False)[0]
        with extra.attach(unet, soft):
            out, _ = block(h, temb, encoder_hidden_states=text)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_noise_pred_conditioning_scale_and_null_prompt():
    unet = tiny_unet()
    torch.manual_seed(7)
    unet_extra = seesr_image_attentions(unet, IMAGE_DIM)
    controlnet, extra = seesr_controlnet_from_unet(unet, unet_extra, conditioning_embedding_out_channels=COND_CHANNELS)
    g = torch.Generator().manual_seed(1)
    z, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    cond, soft = torch.rand(2, 3, 32, 32, generator=g), soft_prompts(1, batch=1)

    def pred(net, scale=1.0, context=soft):
        with torch.no_grad():
            return seesr_noise_pred(unet, net, unet_extra, extra, z, 10, text, cond, context, scale)

    with torch.no_grad(), unet_extra.attach(unet, soft):
        alone = unet(z, 10, encoder_hidden_states=text).sample
    # a fresh ControlNet (zero convolutions) adds nothing, as in the original at the start of training
    torch.testing.assert_close(pred(controlnet), alone, rtol=0, atol=1e-6)
    perturb(controlnet, 8)
    torch.testing.assert_close(pred(controlnet, 0.0), alone, rtol=0, atol=1e-6)
    assert (pred(controlnet, 1.0) - alone).abs().max() > 1e-3
    assert (pred(controlnet, context=soft_prompts(2)) - pred(controlnet)).abs().max() > 1e-4
    null = null_image_prompt(2, IMAGE_DIM)
    assert null.shape == (2, 1, IMAGE_DIM) and not null.any()
    assert torch.isfinite(pred(controlnet, context=null)).all()
    assert isinstance(controlnet, ControlNetModel)
