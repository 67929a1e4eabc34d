"""SRDiff's models: the RRDBNet hidden-feature option (SRDiff's ``get_fea``) leaves RRDBNet as it was, and
SRDiffUNet's shapes, conditioning and errors."""

from __future__ import annotations

import pytest
import torch

from sr_diffusion.models import RRDBNet, RRDBNetOutput, SRDiffUNet
from sr_diffusion.models.outputs import RegressionModelOutput

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


@pytest.mark.parametrize("scale", [4, 8, 2])
def test_rrdbnet_hidden_states_are_the_trunk_features_and_change_nothing_else(scale):
    torch.manual_seed(0)
    model = RRDBNet(num_feat=8, num_block=4, num_grow_ch=4, scale=scale).eval()
    keys = list(model.state_dict())
    assert keys[:2] == ["conv_first.weight", "conv_first.bias"] and "body.3.rdb3.conv5.bias" in keys
    x = torch.rand(2, 3, 6, 4)
    with torch.no_grad():
        plain = model(x)
        out = model(x, output_hidden_states=True)
        sample, hidden = model(x, return_dict=False, output_hidden_states=True)
        # the features by hand: each RRDB's output, then conv_first + conv_body(trunk)
        feat = model.conv_first(torch.nn.functional.pixel_unshuffle(x, 2) if scale == 2 else x)
        expected, trunk = [], feat
        for block in model.body:
            trunk = block(trunk)
            expected.append(trunk)
        expected.append(feat + model.conv_body(trunk))
    assert type(plain) is RegressionModelOutput and isinstance(out, RRDBNetOutput)
    assert len(model(x, return_dict=False)) == 1
    assert torch.equal(out.sample, plain.sample) and torch.equal(sample, plain.sample)
    assert len(out.hidden_states) == len(hidden) == 5
    for a, b, c in zip(out.hidden_states, hidden, expected):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert out.hidden_states[0].shape == (2, 8, *((3, 2) if scale == 2 else (6, 4)))
    assert list(model.state_dict()) == keys


def test_unet_shapes_conditioning_and_save_load(tmp_path):
    torch.manual_seed(0)
    unet = SRDiffUNet(dim=16, dim_mults=(1, 2, 2), cond_dim=8, rrdb_num_block=5, sr_scale=4, up_input=True).eval()
    assert unet.input_multiple == 4 and unet.num_cond_features == 2
    assert tuple(unet.cond_proj.weight.shape) == (16, 16, 8, 8) and tuple(unet.up_proj[1].weight.shape) == (16, 3, 3, 3)
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 8, 3, 5, generator=g) for _ in range(6)]
    x_t, up = torch.randn(2, 3, 12, 20, generator=g), torch.randn(2, 3, 12, 20, generator=g)
    with torch.no_grad():
        eps = unet(x_t, 7, feats, up).sample
        assert eps.shape == (2, 3, 12, 20)
        # only features 2 and 5 are used; the time embedding takes per-sample steps
        unused = [f if i in (2, 5) else torch.zeros_like(f) for i, f in enumerate(feats)]
        assert torch.equal(unet(x_t, 7, unused, up).sample, eps)
        assert torch.equal(unet(x_t, torch.tensor([7, 7]), feats, up, return_dict=False)[0], eps)
        assert not torch.allclose(unet(x_t, torch.tensor([7, 50]), feats, up).sample[1], eps[1])
        assert not torch.allclose(unet(x_t, 7, feats, up * 0).sample, eps)  # up_input: up(x_L) is used
    unet.save_pretrained(tmp_path)
    loaded = SRDiffUNet.from_pretrained(tmp_path).eval()
    assert loaded.config.dim_mults == [1, 2, 2] and loaded.config.up_input
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_t, 7, feats, up).sample, eps, rtol=0, atol=1e-5)


def test_unet_errors():
    with pytest.raises(ValueError, match="dim_mults must be positive and start with 1"):
        SRDiffUNet(dim_mults=(2, 4))
    with pytest.raises(ValueError, match="sr_scale must be even"):
        SRDiffUNet(sr_scale=3)
    with pytest.raises(ValueError, match="rrdb_num_block must be >= 2"):
        SRDiffUNet(rrdb_num_block=1)
    with pytest.raises(ValueError, match="dim must be an even number"):
        SRDiffUNet(dim=7)
    unet = SRDiffUNet(dim=8, dim_mults=(1, 2), cond_dim=4, rrdb_num_block=2, up_input=True)
    feats = [torch.zeros(1, 4, 2, 2)] * 3
    with pytest.raises(ValueError, match="divisible by 2"):
        unet(torch.zeros(1, 3, 9, 8), 0, feats, torch.zeros(1, 3, 9, 8))
    with pytest.raises(ValueError, match="rrdb_num_block \\+ 1 = 3 RRDB feature maps, got 2"):
        unet(torch.zeros(1, 3, 8, 8), 0, feats[:2], torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="pass img_lr_up"):
        unet(torch.zeros(1, 3, 8, 8), 0, feats)
    with pytest.raises(ValueError, match="sr_scale=4 times smaller"):
        unet(torch.zeros(1, 3, 16, 16), 0, feats, torch.zeros(1, 3, 16, 16))
