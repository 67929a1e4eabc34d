"""Learned upsamplers and the x4 sub-pixel mesh (issue 12).

The cause of the mesh is structural, so it is tested on structure: a flat image carries no information about the
output phase ``(y mod 4, x mod 4)``, so a network that treats the phases alike upscales it to a flat image. A
pixel-shuffle output (EDSR's upsampler, ``PixelUnshuffleUNet``'s output) computes each phase with its own kernels and
does not, whatever the weights; ICNR makes it do so at initialisation only; the nearest-neighbour + conv upsampler does
so for every weight.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sr_diffusion.models import EDSR, PixelUnshuffleUNet
from sr_diffusion.models.upsamplers import (
    NearestConvUpsampler,
    icnr_,
    make_pixelshuffle_upsampler,
    upsample_factors,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def phase_spread(img: torch.Tensor, border: int, period: int = 4) -> float:
    """Max over channels of the range of the per-phase means of the interior: 0 for a phase-free image. ``border``
    must exceed the receptive field (the zero padding makes the LR features near an edge differ, which nearest
    upsampling turns into a phase pattern there)."""
    x = img[..., border:-border, border:-border]
    h, w = (s - s % period for s in x.shape[-2:])
    x = x[..., :h, :w].reshape(*x.shape[:-2], h // period, period, w // period, period).mean((-4, -2))
    return float((x.amax((-2, -1)) - x.amin((-2, -1))).max())


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter redrawn (as after training: biases too), so no test relies on a zero bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_upsample_factors():
    assert upsample_factors(1) == [] and upsample_factors(3) == [3]
    assert upsample_factors(4) == [2, 2] and upsample_factors(8) == [2, 2, 2]
    with pytest.raises(ValueError, match="scale 1, 3 or a power of 2"):
        upsample_factors(6)


def test_icnr_starts_as_conv_then_nearest():
    """conv + shuffle with ICNR weights (zero bias) equals nearest-upsampling the output of one of its kernels."""
    torch.manual_seed(0)
    up = make_pixelshuffle_upsampler(4, 8)
    for conv in up[0::2]:
        icnr_(conv.weight, 2)
        nn.init.zeros_(conv.bias)
    x = torch.randn(1, 8, 6, 5)
    out = up(x)
    for conv, _ in zip(up[0::2], up[1::2]):
        x = nn.functional.conv2d(x, conv.weight[::4], None, padding=1)
        x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    torch.testing.assert_close(out, x)
    with pytest.raises(ValueError, match="divisible by scale"):
        icnr_(torch.empty(6, 2, 3, 3), 2)


def test_nearest_conv_upsampler_shapes_and_flops():
    up = NearestConvUpsampler(4, 16, 8)
    x = torch.randn(1, 16, 5, 7)
    with FlopCounterMode(display=False) as counter:
        out = up(x)
    assert out.shape == (1, 8, 20, 28)
    assert up.flops(5, 7) == counter.get_total_flops()
    assert len(NearestConvUpsampler(1, 4)) == 0 and NearestConvUpsampler(3, 4)(torch.zeros(1, 4, 2, 2)).shape[-1] == 6


def test_bilinear_stage_is_nearest_then_a_121_blur():
    """Bilinear x2 (align_corners=False) = nearest x2 followed by the separable [1, 2, 1] / 4 blur with edge
    replication: the blur that zeroes the x2 grid frequency. Same parameters as nearest + conv, so a nearest + conv
    state dict loads into a bilinear + conv upsampler."""
    torch.manual_seed(0)
    nearest, bilinear = NearestConvUpsampler(4, 6, 5), NearestConvUpsampler(4, 6, 5, mode="bilinear")
    bilinear.load_state_dict(nearest.state_dict())
    x = torch.randn(1, 6, 7, 9)
    up = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    blur = (kernel[:, None] * kernel[None, :]).expand(6, 1, 3, 3)
    blurred = nn.functional.conv2d(nn.functional.pad(up, (1, 1, 1, 1), mode="replicate"), blur, groups=6)
    torch.testing.assert_close(bilinear[0](x), blurred, atol=1e-6, rtol=0)
    assert bilinear(x).shape == nearest(x).shape == (1, 5, 28, 36)
    with torch.no_grad():
        assert not torch.allclose(bilinear(x), nearest(x))  # same weights, another function
    with pytest.raises(ValueError, match="mode must be one of"):
        NearestConvUpsampler(2, 4, mode="bicubic")


@pytest.mark.parametrize(
    "kwargs, phase_free",
    [({}, False), ({"upsampler": "nearest_conv"}, True), ({"upsampler": "bilinear_conv"}, True)],
    ids=["pixelshuffle", "nearest_conv", "bilinear_conv"],
)
def test_edsr_flat_input_to_flat_output(kwargs, phase_free):
    model = randomize_(EDSR(num_feat=8, num_block=1, upscale=4, **kwargs))
    with torch.no_grad():
        out = model(torch.full((1, 3, 20, 20), 0.4)).sample
    spread = phase_spread(out, border=28)  # 4 LR convs (16 px) + 3 at 2x and 4x
    assert spread < 1e-5 if phase_free else spread > 1e-3


def test_edsr_icnr_is_phase_free_at_initialisation_only():
    torch.manual_seed(0)
    model = EDSR(num_feat=8, num_block=1, upscale=4, upsample_init="icnr").eval()
    flat = torch.full((1, 3, 20, 20), 0.4)
    with torch.no_grad():
        assert phase_spread(model(flat).sample, border=28) < 1e-5
        assert phase_spread(randomize_(model)(flat).sample, border=28) > 1e-3


@pytest.mark.parametrize(
    "kwargs, phase_free",
    [
        ({}, False),
        ({"upsample_init": "icnr"}, True),  # at initialisation
        ({"upsampler": "nearest_conv", "hr_channels": 8}, True),
        ({"upsampler": "nearest_conv", "hr_channels": 8, "lq_residual": True}, True),
        ({"upsampler": "bilinear_conv", "hr_channels": 8, "lq_residual": True}, True),
    ],
    ids=["pixelshuffle", "icnr-init", "nearest_conv", "nearest_conv-residual", "bilinear_conv-residual"],
)
def test_unshuffle_unet_flat_inputs_to_flat_output(kwargs, phase_free):
    torch.manual_seed(0)
    model = PixelUnshuffleUNet(sample_size=32, block_out_channels=(16, 32), norm_num_groups=8, **kwargs).eval()
    if "upsample_init" not in kwargs:
        randomize_(model)
    flat = torch.full((1, 3, 128, 128), 0.3)
    with torch.no_grad():
        out = model(flat, torch.tensor([2]), lq=flat * 0.5).sample
    assert out.shape == (1, 3, 128, 128)
    spread = phase_spread(out, border=48)  # UNet2DModel's 2 levels of 2 resnets: 10 LR px at the 1/2 level
    assert spread < 1e-5 if phase_free else spread > 1e-3


def test_unshuffle_unet_nearest_conv_residual_adds_lq(tmp_path):
    torch.manual_seed(0)
    model = PixelUnshuffleUNet(
        sample_size=32, block_out_channels=(16, 32), norm_num_groups=8, upsampler="nearest_conv", lq_residual=True
    ).eval()
    assert model.unet.config.out_channels == 16 and model.conv_last.in_channels == 32
    g = torch.Generator().manual_seed(0)
    x_t, lq = torch.randn(2, 3, 32, 16, generator=g), torch.randn(2, 3, 32, 16, generator=g)
    t = torch.tensor([0, 3])
    with torch.no_grad():
        out = model(x_t, t, lq=lq).sample
        detail = model.conv_last(
            model.upsample(
                model.unet(
                    torch.cat([nn.functional.pixel_unshuffle(x_t, 4), nn.functional.pixel_unshuffle(lq, 4)], 1), t
                ).sample
            )
        )
    torch.testing.assert_close(out, lq + detail)
    model.save_pretrained(tmp_path)
    loaded = PixelUnshuffleUNet.from_pretrained(tmp_path).eval()
    assert loaded.config.upsampler == "nearest_conv" and loaded.config.lq_residual is True
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_t, t, lq=lq).sample, out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"upsampler": "bilinear"}, "upsampler must be one of"),
        ({"upsampler": "nearest_conv", "upsample_init": "icnr"}, "upsample_init"),
        ({"lq_residual": True}, "lq_residual needs"),
        ({"upsampler": "nearest_conv", "lq_residual": True, "lq_channels": 0}, "lq_residual needs"),
    ],
)
def test_unshuffle_unet_rejects_bad_upsampler_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PixelUnshuffleUNet(sample_size=32, block_out_channels=(16, 32), norm_num_groups=8, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"upsampler": "deconv"}, "upsampler must be one of"), ({"upsample_init": "orthogonal"}, "upsample_init")],
)
def test_edsr_rejects_bad_upsampler_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EDSR(num_feat=8, num_block=1, **kwargs)
