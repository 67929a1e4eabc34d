"""PixelUnshuffleUNet: a diffusers UNet2DModel between a pixel unshuffle and a pixel shuffle (the generative default's
denoiser). Its routing is checked against the same UNet called by hand; then geometry, errors, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sr_diffusion.models import PixelUnshuffleUNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def tiny(**overrides) -> PixelUnshuffleUNet:
    torch.manual_seed(0)
    kwargs = {"sample_size": 32, "block_out_channels": (16, 32), "norm_num_groups": 8, **overrides}
    return PixelUnshuffleUNet(**kwargs).eval()


def test_forward_is_the_inner_unet_on_the_unshuffled_inputs():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    x_t, lq = torch.randn(2, 3, 16, 24, generator=g), torch.randn(2, 3, 16, 24, generator=g)
    t = torch.tensor([0, 3])
    with torch.no_grad():
        out = model(x_t, t, lq=lq).sample
        inner = model.unet(torch.cat([F.pixel_unshuffle(x_t, 4), F.pixel_unshuffle(lq, 4)], 1), t).sample
    assert model.unet.config.in_channels == 96 and model.unet.config.out_channels == 48
    assert out.shape == (2, 3, 16, 24)
    torch.testing.assert_close(out, F.pixel_shuffle(inner, 4))
    # the timestep reaches the output, and so does lq
    with torch.no_grad():
        assert not torch.allclose(out, model(x_t, torch.tensor([1, 1]), lq=lq).sample)
        assert not torch.allclose(out, model(x_t, t, lq=torch.zeros_like(lq)).sample)
        assert torch.equal(model(x_t, t, lq=lq, return_dict=False)[0], out)


def test_geometry_and_unconditional_variant():
    model = tiny()
    assert (model.input_multiple, model.lq_scale) == (8, 1)  # r = 4 times one 2x down level
    assert tiny(unshuffle_factor=2, block_out_channels=(16, 32, 32)).input_multiple == 8
    plain = tiny(lq_channels=0, out_channels=6)
    with torch.no_grad():
        assert plain(torch.zeros(1, 3, 8, 8), 0).sample.shape == (1, 6, 8, 8)


@pytest.mark.parametrize(
    "sample, lq, message",
    [
        (torch.zeros(1, 3, 12, 16), torch.zeros(1, 3, 12, 16), "divisible by 8"),
        (torch.zeros(1, 4, 16, 16), torch.zeros(1, 3, 16, 16), r"sample must be \(N, 3, H, W\)"),
        (torch.zeros(1, 3, 16, 16), None, "lq must be"),
        (torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 4, 4), "lq must be"),
    ],
)
def test_input_errors(sample, lq, message):
    with pytest.raises(ValueError, match=message):
        tiny()(sample, 0, lq=lq)


def test_config_errors():
    with pytest.raises(ValueError, match="unshuffle_factor"):
        PixelUnshuffleUNet(unshuffle_factor=0)
    with pytest.raises(ValueError, match="lq_channels"):
        PixelUnshuffleUNet(lq_channels=-1)


def test_save_and_load_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "unet")
    loaded = PixelUnshuffleUNet.from_pretrained(tmp_path / "unet").eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x, 2, lq=x).sample, loaded(x, 2, lq=x).sample)
