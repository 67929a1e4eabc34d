"""BlockAttentions: the extra cross-attention layers of PASD (pixel_attentions) and SeeSR (image_attentions) on an
unforked diffusers UNet / ControlNet — placement and names, equivalence with the original block order written out by
hand, contexts, save/load and errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel
from pasd_tiny import reference_pasd_unet
from stablesr_tiny import TEXT_DIM, tiny_unet

from sr_diffusion.models.block_attention import BlockAttentions

pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial weights everywhere (a fresh Transformer2DModel may start close to the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def unet_inputs(batch: int = 2, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=g)
    text = torch.randn(batch, 5, TEXT_DIM, generator=g)
    return sample, torch.tensor(10), text


def test_seesr_layout_names_and_positions():
    unet = tiny_unet()  # down: DownBlock2D, CrossAttnDownBlock2D; up: CrossAttnUpBlock2D, UpBlock2D; lpb 1
    extra = BlockAttentions.after_cross_attention(unet, "image_attentions", context_dim=24)
    assert extra.positions == [
        "down_blocks.1.image_attentions.0",
        "mid_block.image_attentions.0",
        "up_blocks.0.image_attentions.0",
        "up_blocks.0.image_attentions.1",
    ]
    keys = extra.state_dict().keys()
    assert "down_blocks.1.image_attentions.0.transformer_blocks.0.attn2.to_k.weight" in keys
    assert extra.state_dict()["mid_block.image_attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape == (64, 24)
    assert not any(k.startswith(("down_blocks.0.", "up_blocks.1.")) for k in keys)
    # every extra layer mirrors the attention it follows, apart from the context width
    own, added = unet.down_blocks[1].attentions[0].config, extra.down_blocks[1].image_attentions[0].config
    assert (added.num_attention_heads, added.attention_head_dim) == (own.num_attention_heads, own.attention_head_dim)


def test_pasd_layout_follows_the_original_up_blocks():
    unet = tiny_unet()
    extra = BlockAttentions.pasd_pixel_attentions(unet)
    # up block 0 (CrossAttnUpBlock2D, 64 channels): skips of 64 then 32 channels (the last layer takes the skip from
    # the level above); up block 1 (UpBlock2D, 32 channels): context width = its output channels
    assert extra.positions == [f"up_blocks.{i}.pixel_attentions.{j}" for i in (0, 1) for j in (0, 1)]
    dims = [s["cross_attention_dim"] for s in extra.layer_specs]
    assert dims == [64, 32, 32, 32]
    assert [s["after"] for s in extra.layer_specs] == ["attentions", "attentions", "resnets", "resnets"]
    specs = extra.layer_specs  # copies, aligned with positions: the layout cannot be changed through them
    assert [f"{s['block']}.pixel_attentions.{s['index']}" for s in specs] == extra.positions
    specs[0]["cross_attention_dim"] = 1
    assert extra.layer_specs[0]["cross_attention_dim"] == 64
    k = "up_blocks.1.pixel_attentions.1.transformer_blocks.0.attn2.to_k.weight"
    assert extra.state_dict()[k].shape == (32, 32)
    # the plain block's layer: 8 heads (attention_head_dim=8 is diffusers' name for the head count), 32/8 per head
    layer = extra.up_blocks[1].pixel_attentions[0]
    assert layer.config.num_attention_heads == 8 and layer.config.attention_head_dim == 4


def test_attached_unet_equals_the_original_block_order_written_out():
    """The hooked diffusers UNet computes what the original PASD up blocks compute: resnet → text attention → PACA
    with the ControlNet residual of the same skip (popped in the skip order)."""
    torch.manual_seed(0)
    unet = tiny_unet()
    extra = BlockAttentions.pasd_pixel_attentions(unet)
    randomize(extra)
    sample, t, text = unet_inputs()
    g = torch.Generator().manual_seed(3)
    # residuals with the shapes of the UNet's skips (conv_in, down 0 resnet, down 0 downsample, down 1 resnet)
    shapes = [(2, 32, 8, 8), (2, 32, 8, 8), (2, 32, 4, 4), (2, 64, 4, 4)]
    residuals = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    mid = torch.randn(2, 64, 4, 4, generator=g) * 0.1
    contexts = {p: residuals[-1 - k] for k, p in enumerate(extra.positions)}
    control = {"down_block_additional_residuals": residuals, "mid_block_additional_residual": mid}
    with torch.no_grad():
        with extra.attach(unet, contexts):
            got = unet(sample, t, text, **control, return_dict=False)[0]
        expected = reference_pasd_unet(unet, extra, sample, t, text, residuals, mid)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the layers matter: without them the output differs
    with torch.no_grad():
        plain = unet(sample, t, text, **control, return_dict=False)[0]
    assert (plain - got).abs().max() > 1e-3


def test_seesr_controlnet_layers_hook_and_repeat_for_guidance():
    unet = tiny_unet()
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    extra = BlockAttentions.after_cross_attention(controlnet, "image_attentions", context_dim=24)
    assert extra.positions == ["down_blocks.1.image_attentions.0", "mid_block.image_attentions.0"]
    extra.check_model(controlnet)
    randomize(extra)
    randomize(controlnet, seed=2)  # its zero convolutions would hide everything
    sample, t, text = unet_inputs()
    cond = torch.rand(2, 3, 16, 16)  # the conditioning embedding halves it once per extra width
    tokens = torch.randn(1, 6, 24)
    with torch.no_grad():
        with extra.attach(controlnet, tokens):  # batch 1 repeated to the model's 2
            down, mid = controlnet(sample, t, text, controlnet_cond=cond, return_dict=False)
        with extra.attach(controlnet, tokens.repeat(2, 1, 1)):
            down2, mid2 = controlnet(sample, t, text, controlnet_cond=cond, return_dict=False)
        plain = controlnet(sample, t, text, controlnet_cond=cond, return_dict=False)[1]
    torch.testing.assert_close(mid, mid2)
    assert (mid - plain).abs().max() > 1e-4
    # the hooks are gone after the block
    with torch.no_grad():
        again = controlnet(sample, t, text, controlnet_cond=cond, return_dict=False)[1]
    torch.testing.assert_close(again, plain)


def test_save_load_round_trip(tmp_path):
    unet = tiny_unet()
    extra = BlockAttentions.pasd_pixel_attentions(unet)
    randomize(extra)
    extra.save_pretrained(tmp_path)
    loaded = BlockAttentions.from_pretrained(tmp_path)
    assert loaded.positions == extra.positions
    for (k, a), (k2, b) in zip(extra.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_errors():
    unet = tiny_unet()
    extra = BlockAttentions.after_cross_attention(unet, "image_attentions", context_dim=24)
    narrower = tiny_unet(block_out_channels=(32, 32))
    with pytest.raises(ValueError, match="has 32 channels but"):
        extra.check_model(narrower)
    sample, t, text = unet_inputs()
    with pytest.raises(ValueError, match=r"\(B, L, 24\)"):
        with extra.attach(unet, torch.randn(2, 6, 23)):
            unet(sample, t, text)
    with pytest.raises(ValueError, match="no image_attentions context"):
        with extra.attach(unet, {"mid_block.image_attentions.0": torch.randn(2, 6, 24)}):
            pass
    with pytest.raises(ValueError, match="batch 3"):
        with extra.attach(unet, torch.randn(3, 6, 24)):
            unet(sample, t, text)
    with pytest.raises(ValueError, match="indices"):
        spec = dict(extra.config.layers[0], index=1)
        BlockAttentions(name="x", layers=[spec])
    from diffusers import UNet2DModel

    plain = UNet2DModel(
        block_out_channels=(32, 32), down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2
    )
    with pytest.raises(ValueError, match="no cross-attention"):
        BlockAttentions.after_cross_attention(plain)
