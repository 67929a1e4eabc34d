"""Regression SR architectures: shapes at every scale, the uniform interface, save/load, FLOP counts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sr_diffusion.models import (
    EDSR,
    REGRESSION_MODELS,
    RegressionModelOutput,
    RRDBNet,
    SRVGGNetCompact,
    SwinIR,
)

TINY_SWINIR = {"embed_dim": 12, "depths": (2,), "num_heads": (2,), "window_size": 4, "num_feat": 8}


def tiny(name: str, scale: int, **kwargs):
    """A tiny, seeded model of each architecture at the given scale."""
    torch.manual_seed(0)
    if name == "edsr":
        return EDSR(num_feat=8, num_block=1, upscale=scale, **kwargs)
    if name == "rrdbnet":
        return RRDBNet(num_feat=8, num_block=1, num_grow_ch=4, scale=scale, **kwargs)
    if name == "swinir":
        return SwinIR(**{**TINY_SWINIR, "upscale": scale, **kwargs})
    if name == "srvgg":
        return SRVGGNetCompact(num_feat=8, num_conv=2, upscale=scale, **kwargs)
    raise KeyError(name)


CASES = (
    [("edsr", s, {}) for s in (1, 2, 3, 4, 8)]
    + [("edsr", s, {"upsampler": "nearest_conv"}) for s in (2, 3, 4)]
    + [("edsr", 4, {"upsample_init": "icnr"})]
    + [("rrdbnet", s, {}) for s in (1, 2, 4, 8)]
    + [("swinir", s, {"upsampler": "pixelshuffle"}) for s in (1, 2, 3, 4, 8)]
    + [("swinir", s, {"upsampler": "pixelshuffledirect"}) for s in (1, 2, 3, 4)]
    + [("swinir", s, {"upsampler": "nearest+conv"}) for s in (2, 4)]
    + [("swinir", 1, {"upsampler": "", "resi_connection": "3conv"})]
    + [("srvgg", s, {"act_type": a}) for s, a in ((1, "prelu"), (2, "relu"), (3, "leakyrelu"), (4, "prelu"))]
)


def _id(case):
    name, scale, kwargs = case
    return f"{name}-x{scale}-" + "-".join(str(v) or "none" for v in kwargs.values())


def test_registry_and_exports():
    from sr_diffusion import models

    assert REGRESSION_MODELS == {"edsr": EDSR, "rrdbnet": RRDBNet, "swinir": SwinIR, "srvgg": SRVGGNetCompact}
    assert set(models.__all__) >= {"EDSR", "RRDBNet", "SwinIR", "SRVGGNetCompact", "RegressionModelOutput"}


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_shapes_interface_and_flops(case):
    name, scale, kwargs = case
    model = tiny(name, scale, **kwargs).eval()
    assert model.upscale == scale
    multiple = model.input_multiple
    assert multiple == {"swinir": 4, "rrdbnet": {1: 4, 2: 2}.get(scale, 1)}.get(name, 1)
    h, w = 4 * multiple, (3 * multiple if multiple > 1 else 5)
    x = torch.rand(2, 3, h, w)

    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        out = model(x)
    assert isinstance(out, RegressionModelOutput)
    assert out.sample.shape == (2, 3, h * scale, w * scale)
    assert out.sample.dtype == x.dtype
    counted = counter.get_total_flops() / 2  # per image
    assert abs(model.flops(h, w) - counted) <= 0.02 * counted

    with torch.no_grad():
        (tuple_out,) = model(x, return_dict=False)
        single = model(x[1:]).sample
    torch.testing.assert_close(tuple_out, out.sample)
    # a batch of one may take other float32 kernels than a batch of two: outputs of order 1 after a few hundred
    # accumulated products differ by ~1e-5 under load, so 1e-4 (still far below 1/255, one 8-bit level)
    torch.testing.assert_close(single, out.sample[1:], rtol=0, atol=1e-4)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the two matmuls of attention: FlopCounterMode has no formula for the CPU flash kernel."""
    b, h, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def test_released_sizes_flops_match_counter():
    """flops() on realistic widths (meta tensors: no memory, no compute) agrees with FlopCounterMode."""
    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    models = [
        RRDBNet(num_block=2, scale=2),
        EDSR(num_feat=256, num_block=2, upscale=3, res_scale=0.1),
        SwinIR(depths=(2, 2), num_heads=(6, 6)),
        SwinIR(embed_dim=60, depths=(2,), num_heads=(6,), upsampler="pixelshuffledirect", upscale=2),
        SRVGGNetCompact(num_conv=4),
    ]
    for model in models:
        model = model.to("meta")
        x = torch.empty(1, 3, 32, 48, device="meta")
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
            model(x)
        counted = counter.get_total_flops()
        assert counted > 0
        assert abs(model.flops(32, 48) - counted) <= 0.02 * counted, type(model).__name__


@pytest.mark.parametrize("name", ["edsr", "rrdbnet", "swinir", "srvgg"])
def test_save_pretrained_round_trip(name, tmp_path):
    scale = 2
    model = tiny(name, scale).eval()
    model.save_pretrained(tmp_path / name)
    loaded = type(model).from_pretrained(tmp_path / name).eval()
    assert _same_config(loaded.config, model.config)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.rand(1, 3, 8, 12)
    with torch.no_grad():
        assert torch.equal(model(x).sample, loaded(x).sample)


def _same_config(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    keys = {k for k in a if not k.startswith("_")}
    return keys == {k for k in b if not k.startswith("_")} and all(norm(a[k]) == norm(b[k]) for k in keys)


def test_swinir_any_input_size_and_padding():
    """Sizes that are not multiples of the window are padded internally and cropped back; the shifted-window
    mask is computed for the actual size, so a model built once runs on every size."""
    model = tiny("swinir", 2).eval()
    with torch.no_grad():
        for h, w in [(4, 4), (8, 12), (5, 7), (3, 2), (16, 8)]:
            assert model(torch.rand(1, 3, h, w)).sample.shape == (1, 3, 2 * h, 2 * w)
        # internal padding equals padding by the caller then cropping
        x = torch.rand(1, 3, 6, 7)
        padded = torch.nn.functional.pad(x, (0, 1, 0, 2), mode="reflect")
        torch.testing.assert_close(model(x).sample, model(padded).sample[..., :12, :14])


def test_swinir_mask_blocks_attention_across_shifted_regions():
    from sr_diffusion.models.swinir import shifted_window_mask

    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask[0] == 0)  # the top-left window holds a single region
    last = mask[3]  # the bottom-right window holds four regions after the shift
    assert last[0, 0] == 0 and last[0, 3] == -100 and last[0, 15] == -100
    assert set(last.unique().tolist()) == {0.0, -100.0}


def test_rrdbnet_rejects_sizes_the_unshuffle_cannot_take():
    model = tiny("rrdbnet", 1)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(1, 3, 6, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        model(torch.rand(3, 8, 8))


def test_dtype_follows_input_and_backward():
    for name in ("edsr", "rrdbnet", "swinir", "srvgg"):
        model = tiny(name, 2).double()
        x = torch.rand(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        out = model(x).sample
        assert out.dtype == torch.float64
        out.mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_invalid_configs():
    with pytest.raises(ValueError, match="upscale"):
        EDSR(upscale=5)
    with pytest.raises(ValueError, match="scale"):
        RRDBNet(scale=3)
    with pytest.raises(ValueError, match="upsampler"):
        SwinIR(**{**TINY_SWINIR, "upsampler": "nearest+conv", "upscale": 3})
    with pytest.raises(ValueError, match="upsampler must be"):
        SwinIR(**{**TINY_SWINIR, "upsampler": "bicubic"})
    with pytest.raises(ValueError, match="act_type"):
        SRVGGNetCompact(act_type="gelu")
