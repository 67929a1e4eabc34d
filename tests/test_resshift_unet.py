"""ResShiftUNet (ResShift's Swin-UNet denoiser): shapes, conditioning, batching, save/load, input checks."""

from __future__ import annotations

import math

import pytest
import torch

from sr_diffusion.models.resshift_unet import ResShiftUNet, ResShiftUNetOutput, timestep_embedding

TINY = {
    "image_size": 16,
    "in_channels": 3,
    "model_channels": 32,
    "out_channels": 3,
    "num_res_blocks": 1,
    "attention_resolutions": (16, 8),
    "channel_mult": (1, 2),
    "num_head_channels": 16,
    "swin_depth": 2,
    "swin_embed_dim": 32,
    "window_size": 4,
    "mlp_ratio": 2.0,
    "lq_size": 16,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def tiny_unet(**overrides) -> ResShiftUNet:
    """A tiny seeded model. The original zero-initialises the last conv of every residual block (each block
    starts as the identity, so the timestep would not reach the output): perturb every weight."""
    torch.manual_seed(0)
    model = ResShiftUNet(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(n=2, size=16, in_channels=3, lq_scale=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_channels, size, size, generator=g)
    lq = torch.rand(n, 3, size * lq_scale, size * lq_scale, generator=g) * 2 - 1
    return x, lq


def test_output_shape_dict_and_tuple():
    model = tiny_unet()
    x, lq = inputs()
    with torch.no_grad():
        out = model(x, torch.tensor([0, 3]), lq=lq)
        (tup,) = model(x, torch.tensor([0, 3]), lq=lq, return_dict=False)
    assert isinstance(out, ResShiftUNetOutput)
    assert out.sample.shape == (2, 3, 16, 16) and out.sample.dtype == x.dtype
    torch.testing.assert_close(tup, out.sample, rtol=0, atol=0)
    assert torch.isfinite(out.sample).all()


def test_out_channels_and_in_channels_differ():
    model = tiny_unet(in_channels=4, out_channels=6)
    x, lq = inputs(in_channels=4)
    with torch.no_grad():
        assert model(x, 1, lq=lq).sample.shape == (2, 6, 16, 16)


def test_batch_equals_single_and_scalar_timestep():
    model = tiny_unet()
    x, lq = inputs()
    t = torch.tensor([2, 9])
    with torch.no_grad():
        batch = model(x, t, lq=lq).sample
        singles = torch.cat([model(x[i : i + 1], t[i : i + 1], lq=lq[i : i + 1]).sample for i in range(2)])
        scalar = model(x, 2, lq=lq).sample
        per_item = model(x, torch.tensor([2, 2]), lq=lq).sample
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scalar, per_item, rtol=0, atol=0)


def test_timestep_and_lq_change_the_output():
    model = tiny_unet()
    x, lq = inputs()
    with torch.no_grad():
        base = model(x, 0, lq=lq).sample
        later = model(x, 10, lq=lq).sample
        other_lq = model(x, 0, lq=-lq).sample
    assert (base - later).abs().max() > 1e-3
    assert (base - other_lq).abs().max() > 1e-3


def test_save_and_load_round_trip(tmp_path):
    model = tiny_unet()
    model.save_pretrained(tmp_path / "unet")
    loaded = ResShiftUNet.from_pretrained(tmp_path / "unet").eval()

    def plain(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    assert plain(loaded.config) == plain(model.config)
    x, lq = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 5, lq=lq).sample, model(x, 5, lq=lq).sample, rtol=0, atol=0)


def test_input_multiple_and_clear_errors():
    model = tiny_unet()
    # two levels (one halving) and 4x4 windows on both: 2 · 4 = 8
    assert model.input_multiple == 8
    x, lq = inputs(size=12)
    with pytest.raises(ValueError, match=r"divisible by 8 \(its input_multiple\), got 12x12"):
        model(x, 0, lq=lq)
    x, lq = inputs()
    with pytest.raises(ValueError, match=r"conditioned on the LR image"):
        model(x, 0)
    with pytest.raises(ValueError, match=r"lq must have shape \(2, 3, 16, 16\)"):
        model(x, 0, lq=lq[:, :, :8, :8])
    with pytest.raises(ValueError, match=r"3 channels, the model expects in_channels=4"):
        tiny_unet(in_channels=4)(x, 0, lq=lq)
    with pytest.raises(ValueError, match=r"takes no mask"):
        model(x, 0, lq=lq, mask=lq[:, :1])
    with pytest.raises(ValueError, match=r"timestep must be a scalar or have shape \(2,\)"):
        model(x, torch.tensor([1, 2, 3]), lq=lq)
    with pytest.raises(ValueError, match=r"power of two"):
        ResShiftUNet(**{**TINY, "lq_size": 24})


def test_sizes_other_than_image_size_and_a_shrunk_window():
    # a level whose size at image_size equals the window keeps an unshifted window of that size
    # (the released 8x8 bottom level); inputs larger than image_size still run
    model = tiny_unet(channel_mult=(1, 2, 2), attention_resolutions=(16, 8, 4))
    assert model.input_multiple == 16
    x, lq = inputs(n=1, size=32)
    with torch.no_grad():
        assert model(x, 3, lq=lq).sample.shape == (1, 3, 32, 32)
    small = tiny_unet()
    x, lq = inputs(n=1, size=8)
    with torch.no_grad():
        assert small(x, 3, lq=lq).sample.shape == (1, 3, 8, 8)


def test_lq_feature_extractor_and_inpainting_mask():
    # lq_size = 2 · image_size: one [conv, SiLU, stride-2 conv] stage; cond_mask: a 4th lq channel
    model = tiny_unet(lq_size=32, cond_mask=True)
    assert model.lq_scale == 2
    assert model.input_blocks[0][0].in_channels == 3 + 32
    x, lq = inputs(lq_scale=2)
    mask = torch.ones(2, 1, 32, 32)
    with torch.no_grad():
        out = model(x, 1, lq=lq, mask=mask).sample
        other = model(x, 1, lq=lq, mask=-mask).sample
    assert out.shape == (2, 3, 16, 16)
    assert (out - other).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"pass mask"):
        model(x, 1, lq=lq)


def test_timestep_embedding_is_adm_cos_sin():
    t = torch.tensor([0.0, 3.0, 250.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([math.exp(-math.log(10000.0) * k / 4) for k in range(4)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(t, 7).shape == (3, 7)
