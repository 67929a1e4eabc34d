"""Loading the checkpoints the authors released: layouts, inferred hyper-parameters, numerics, errors.

Each test writes a state dict with random weights in the ORIGINAL key layout (EDSR-PyTorch, old-style
and 2019 ESRGAN, BasicSR / Real-ESRGAN ``params_ema``, official SwinIR with its buffers, SRVGG ``params``)
to .pth and .safetensors files, loads it with ``load_regression_model`` and compares the output with a
functional re-implementation of the original forward pass that reads the original keys directly.
"""

from __future__ import annotations

import argparse
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sr_diffusion.checkpoints import (
    CheckpointError,
    convert_state_dict,
    detect_architecture,
    load_regression_model,
    load_state_dict,
    unwrap_state_dict,
)
from sr_diffusion.models import EDSR, RRDBNet, SRVGGNetCompact, SwinIR

DIV2K_MEAN = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------------
# helpers: random tensors in a given layout, files, comparison
# ----------------------------------------------------------------------------------------------


def random_state_dict(spec: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for ``{key: shape}``: fan-in scaled weights, small biases, positive LayerNorm scales."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in spec.items():
        if key.endswith("bias") or len(shape) == 1:
            out[key] = 0.05 * torch.randn(shape, generator=gen)
            if "norm" in key and key.endswith("weight"):
                out[key] += 1.0
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            out[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return out


def conv_spec(name: str, cin: int, cout: int, k: int = 3) -> dict[str, tuple]:
    return {f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)}


def conv(x, sd, name, padding=1):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=padding)


def lrelu(x, slope=0.2):
    return F.leaky_relu(x, slope)


def save_both(tmp_path, stem, wrapped, flat):
    """The checkpoint as the authors ship it (.pth, possibly wrapped) and as flat .safetensors."""
    pth, st = tmp_path / f"{stem}.pth", tmp_path / f"{stem}.safetensors"
    torch.save(wrapped, pth)
    save_file({k: v.contiguous() for k, v in flat.items()}, st)
    return pth, st


def check_loaded(paths, expected_cls, expected_config, reference, x, atol=1e-5):
    for path in paths:
        model = load_regression_model(path)
        assert type(model) is expected_cls
        assert not model.training
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if k[0] != "_"}
        assert config == {**config, **expected_config}, path
        with torch.no_grad():
            out = model(x).sample
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=atol)
    return model


# ----------------------------------------------------------------------------------------------
# EDSR
# ----------------------------------------------------------------------------------------------


def edsr_official_spec(n_feats, n_blocks, scale):
    spec = {"sub_mean.weight": (3, 3, 1, 1), "sub_mean.bias": (3,), "add_mean.weight": (3, 3, 1, 1)}
    spec["add_mean.bias"] = (3,)
    spec.update(conv_spec("head.0", 3, n_feats))
    for i in range(n_blocks):
        spec.update(conv_spec(f"body.{i}.body.0", n_feats, n_feats))
        spec.update(conv_spec(f"body.{i}.body.2", n_feats, n_feats))
    spec.update(conv_spec(f"body.{n_blocks}", n_feats, n_feats))
    stages = [(0, 9)] if scale == 3 else [(2 * i, 4) for i in range(int(math.log2(scale)))]
    for idx, mult in stages:
        spec.update(conv_spec(f"tail.0.{idx}", n_feats, mult * n_feats))
    spec.update(conv_spec("tail.1", n_feats, 3))
    return spec


def edsr_official_state_dict(n_feats, n_blocks, scale, rgb_range=255.0):
    sd = random_state_dict(edsr_official_spec(n_feats, n_blocks, scale))
    eye = torch.eye(3).view(3, 3, 1, 1)  # MeanShift with rgb_std = 1
    sd["sub_mean.weight"], sd["add_mean.weight"] = eye.clone(), eye.clone()
    sd["sub_mean.bias"] = -rgb_range * DIV2K_MEAN.flatten()
    sd["add_mean.bias"] = rgb_range * DIV2K_MEAN.flatten()
    return sd


def edsr_official_forward(sd, x, n_blocks, scale, res_scale):
    """EDSR-PyTorch ``EDSR.forward`` on an image in [0, rgb_range]."""
    x = F.conv2d(x, sd["sub_mean.weight"], sd["sub_mean.bias"])
    x = conv(x, sd, "head.0")
    res = x
    for i in range(n_blocks):
        res = conv(F.relu(conv(res, sd, f"body.{i}.body.0")), sd, f"body.{i}.body.2") * res_scale + res
    res = conv(res, sd, f"body.{n_blocks}") + x
    stages = [(0, 3)] if scale == 3 else [(2 * i, 2) for i in range(int(math.log2(scale)))]
    for idx, r in stages:
        res = F.pixel_shuffle(conv(res, sd, f"tail.0.{idx}"), r)
    out = conv(res, sd, "tail.1")
    return F.conv2d(out, sd["add_mean.weight"], sd["add_mean.bias"])


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_edsr_official_layout(tmp_path, scale):
    sd = edsr_official_state_dict(n_feats=8, n_blocks=2, scale=scale)
    x = torch.rand(1, 3, 6, 7)
    reference = edsr_official_forward(sd, x * 255.0, 2, scale, res_scale=1.0) / 255.0
    expected = {"num_feat": 8, "num_block": 2, "upscale": scale, "res_scale": 1.0, "img_range": 255.0}
    assert detect_architecture(sd) == (
        "edsr",
        {"num_in_ch": 3, "num_out_ch": 3, **expected, "rgb_mean": [0.4488, 0.4371, 0.404]},
    )
    paths = save_both(tmp_path, f"edsr_baseline_x{scale}", sd, sd)
    model = check_loaded(paths, EDSR, expected, reference, x)
    assert model.upscale == scale


def test_edsr_official_rgb_range_1_and_full_size_defaults(tmp_path):
    sd = edsr_official_state_dict(n_feats=8, n_blocks=1, scale=2, rgb_range=1.0)
    x = torch.rand(1, 3, 5, 5)
    reference = edsr_official_forward(sd, x, 1, 2, res_scale=1.0)
    model = load_regression_model(sd, arch="edsr", scale=2)
    assert model.config.img_range == 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(x).sample, reference, rtol=1e-5, atol=1e-5)
    # EDSR full (256 features): res_scale cannot be read from the tensors; the released value is the default
    big = {k: torch.zeros(v) for k, v in edsr_official_spec(256, 1, 2).items()}
    big["sub_mean.weight"] = big["add_mean.weight"] = torch.eye(3).view(3, 3, 1, 1)
    big["add_mean.bias"] = 255 * DIV2K_MEAN.flatten()
    assert detect_architecture(big)[1]["res_scale"] == 0.1
    # and it can be overridden
    assert load_regression_model(sd, res_scale=0.5).config.res_scale == 0.5


def test_edsr_basicsr_layout_params(tmp_path):
    """BasicSR EDSR files are ``{"params": ...}`` without a mean entry (the mean is a plain attribute there)."""
    spec = conv_spec("conv_first", 3, 8)
    for i in range(2):
        spec.update(conv_spec(f"body.{i}.conv1", 8, 8))
        spec.update(conv_spec(f"body.{i}.conv2", 8, 8))
    spec.update(conv_spec("conv_after_body", 8, 8))
    spec.update(conv_spec("upsample.0", 8, 32))
    spec.update(conv_spec("upsample.2", 8, 32))
    spec.update(conv_spec("conv_last", 8, 3))
    sd = random_state_dict(spec, seed=1)
    x = torch.rand(1, 3, 5, 6)
    # BasicSR EDSR.forward
    h = conv((x - DIV2K_MEAN) * 255.0, sd, "conv_first")
    res = h
    for i in range(2):
        res = res + conv(F.relu(conv(res, sd, f"body.{i}.conv1")), sd, f"body.{i}.conv2") * 1.0
    res = conv(res, sd, "conv_after_body") + h
    res = F.pixel_shuffle(conv(F.pixel_shuffle(conv(res, sd, "upsample.0"), 2), sd, "upsample.2"), 2)
    reference = conv(res, sd, "conv_last") / 255.0 + DIV2K_MEAN
    pth = tmp_path / "EDSR_Mx4_f64b16_DIV2K_official-0c287733.pth"
    torch.save({"params": sd}, pth)
    check_loaded([pth], EDSR, {"num_feat": 8, "num_block": 2, "upscale": 4}, reference, x)


# ----------------------------------------------------------------------------------------------
# RRDBNet: old-style ESRGAN, 2019 ESRGAN, BasicSR / Real-ESRGAN params_ema
# ----------------------------------------------------------------------------------------------


def basicsr_rrdb_spec(nf, nb, gc, scale):
    in_ch = {1: 48, 2: 12}.get(scale, 3)
    spec = conv_spec("conv_first", in_ch, nf)
    for i in range(nb):
        for r in (1, 2, 3):
            for c in range(1, 6):
                spec.update(conv_spec(f"body.{i}.rdb{r}.conv{c}", nf + (c - 1) * gc, gc if c < 5 else nf))
    for name in ["conv_body", "conv_up1", "conv_up2"] + (["conv_up3"] if scale == 8 else []) + ["conv_hr"]:
        spec.update(conv_spec(name, nf, nf))
    spec.update(conv_spec("conv_last", nf, 3))
    return spec


def old_style_name(name: str, nb: int, n_up: int) -> str:
    """ESRGAN old arch (``model.N``) key of a BasicSR key, after ESRGAN's transer_RRDB_models.py."""
    part, leaf = name.rsplit(".", 1)
    if part.startswith("body."):
        _, i, rdb, c = part.split(".")
        return f"model.1.sub.{i}.RDB{rdb[-1]}.{c}.0.{leaf}"
    index = {"conv_first": 0, "conv_body": None, "conv_hr": 2 + 3 * n_up, "conv_last": 4 + 3 * n_up}
    index.update({f"conv_up{k + 1}": 3 + 3 * k for k in range(n_up)})
    if part == "conv_body":
        return f"model.1.sub.{nb}.{leaf}"
    return f"model.{index[part]}.{leaf}"


def esrgan2019_name(name: str) -> str:
    """ESRGAN repository (RRDBNet_arch.py) key of a BasicSR key, after BasicSR's convert_esrgan_model."""
    if ".rdb" in name:
        return name.replace("rdb", "RDB").replace("body", "RRDB_trunk")
    return name.replace("conv_body", "trunk_conv").replace("conv_up", "upconv").replace("conv_hr", "HRconv")


def rrdb_forward(x, p, nb, scale):
    """ESRGAN / BasicSR RRDBNet forward; ``p(name)`` returns the tensor of a BasicSR-named parameter."""

    def c(t, name):
        return F.conv2d(t, p(f"{name}.weight"), p(f"{name}.bias"), padding=1)

    if scale in (1, 2):  # BasicSR pixel_unshuffle: view + permute
        s = 4 if scale == 1 else 2
        b, ch, hh, ww = x.shape
        x = x.view(b, ch, hh // s, s, ww // s, s).permute(0, 1, 3, 5, 2, 4).reshape(b, ch * s * s, hh // s, ww // s)
    fea = c(x, "conv_first")
    trunk = fea
    for i in range(nb):
        out = trunk
        for r in (1, 2, 3):
            base = f"body.{i}.rdb{r}"
            x1 = lrelu(c(out, f"{base}.conv1"))
            x2 = lrelu(c(torch.cat((out, x1), 1), f"{base}.conv2"))
            x3 = lrelu(c(torch.cat((out, x1, x2), 1), f"{base}.conv3"))
            x4 = lrelu(c(torch.cat((out, x1, x2, x3), 1), f"{base}.conv4"))
            x5 = c(torch.cat((out, x1, x2, x3, x4), 1), f"{base}.conv5")
            out = x5 * 0.2 + out
        trunk = out * 0.2 + trunk
    fea = fea + c(trunk, "conv_body")
    for k in range(3 if scale == 8 else 2):
        fea = lrelu(c(F.interpolate(fea, scale_factor=2, mode="nearest"), f"conv_up{k + 1}"))
    return c(lrelu(c(fea, "conv_hr")), "conv_last")


@pytest.mark.parametrize("scale", [4, 8])
def test_esrgan_old_style_layout(tmp_path, scale):
    nf, nb, gc = 8, 2, 4
    n_up = 3 if scale == 8 else 2
    ours = random_state_dict(basicsr_rrdb_spec(nf, nb, gc, scale), seed=2)
    sd = {old_style_name(k, nb, n_up): v for k, v in ours.items()}
    assert "model.1.sub.0.RDB1.conv1.0.weight" in sd and f"model.{4 + 3 * n_up}.weight" in sd
    x = torch.rand(1, 3, 5, 6)
    reference = rrdb_forward(x, lambda n: sd[old_style_name(n, nb, n_up)], nb, scale)
    expected = {
        "num_in_ch": 3,
        "num_out_ch": 3,
        "scale": scale,
        "num_feat": nf,
        "num_block": nb,
        "num_grow_ch": gc,
    }
    assert detect_architecture(sd) == ("rrdbnet", expected)
    paths = save_both(tmp_path, f"RRDB_ESRGAN_x{scale}_old_arch", sd, sd)
    check_loaded(paths, RRDBNet, expected, reference, x)


def test_esrgan_2019_layout(tmp_path):
    ours = random_state_dict(basicsr_rrdb_spec(8, 1, 4, 4), seed=3)
    sd = {esrgan2019_name(k): v for k, v in ours.items()}
    assert "RRDB_trunk.0.RDB2.conv3.weight" in sd and "HRconv.bias" in sd and "upconv2.weight" in sd
    x = torch.rand(1, 3, 4, 5)
    reference = rrdb_forward(x, lambda n: sd[esrgan2019_name(n)], 1, 4)
    paths = save_both(tmp_path, "RRDB_ESRGAN_x4", sd, sd)
    check_loaded(paths, RRDBNet, {"scale": 4, "num_block": 1}, reference, x)


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_realesrgan_params_ema_layout(tmp_path, scale):
    """Real-ESRGAN files hold ``params_ema`` (preferred) and sometimes ``params``; x2plus/x1 pixel-unshuffle."""
    ema = random_state_dict(basicsr_rrdb_spec(8, 1, 4, scale), seed=4)
    params = random_state_dict(basicsr_rrdb_spec(8, 1, 4, scale), seed=5)
    x = torch.rand(1, 3, 8, 12)
    reference = rrdb_forward(x, ema.__getitem__, 1, scale)
    paths = save_both(tmp_path, f"RealESRGAN_x{scale}plus", {"params_ema": ema, "params": params}, ema)
    model = check_loaded(paths, RRDBNet, {"scale": scale, "num_feat": 8, "num_grow_ch": 4}, reference, x)
    assert model.input_multiple == {1: 4, 2: 2, 4: 1}[scale]
    # the non-EMA weights on request
    assert torch.equal(load_state_dict(paths[0], key="params")["conv_last.weight"], params["conv_last.weight"])


# ----------------------------------------------------------------------------------------------
# SwinIR (official layout, with the attn_mask and relative_position_index buffers)
# ----------------------------------------------------------------------------------------------


def official_relative_position_index(ws):
    coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


def official_partition(x, ws):
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def official_reverse(windows, ws, h, w):
    b = int(windows.shape[0] / (h * w / ws / ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def official_mask(h, w, ws, shift):
    img_mask = torch.zeros((1, h, w, 1))
    slices = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    cnt = 0
    for hs in slices:
        for wsl in slices:
            img_mask[:, hs, wsl, :] = cnt
            cnt += 1
    mw = official_partition(img_mask, ws).view(-1, ws * ws)
    mask = mw.unsqueeze(1) - mw.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def swinir_official_state_dict(cfg, img_size, seed=6):
    e, ws, cin = cfg["embed_dim"], cfg["window_size"], 3
    hidden = int(e * cfg["mlp_ratio"])
    spec = conv_spec("conv_first", cin, e)
    spec.update({"patch_embed.norm.weight": (e,), "patch_embed.norm.bias": (e,)})

    def resi(name):
        if cfg["resi_connection"] == "1conv":
            return conv_spec(name, e, e)
        return {
            **conv_spec(f"{name}.0", e, e // 4),
            **conv_spec(f"{name}.2", e // 4, e // 4, 1),
            **conv_spec(f"{name}.4", e // 4, e),
        }

    for i, (depth, heads) in enumerate(zip(cfg["depths"], cfg["num_heads"])):
        for j in range(depth):
            p = f"layers.{i}.residual_group.blocks.{j}"
            spec.update({f"{p}.norm1.weight": (e,), f"{p}.norm1.bias": (e,), f"{p}.norm2.weight": (e,)})
            spec.update(
                {
                    f"{p}.norm2.bias": (e,),
                    f"{p}.attn.relative_position_bias_table": ((2 * ws - 1) ** 2, heads),
                }
            )
            spec.update({f"{p}.attn.qkv.weight": (3 * e, e), f"{p}.attn.qkv.bias": (3 * e,)})
            spec.update({f"{p}.attn.proj.weight": (e, e), f"{p}.attn.proj.bias": (e,)})
            spec.update({f"{p}.mlp.fc1.weight": (hidden, e), f"{p}.mlp.fc1.bias": (hidden,)})
            spec.update({f"{p}.mlp.fc2.weight": (e, hidden), f"{p}.mlp.fc2.bias": (e,)})
        spec.update(resi(f"layers.{i}.conv"))
    spec.update({"norm.weight": (e,), "norm.bias": (e,)})
    spec.update(resi("conv_after_body"))
    nf, s, up = cfg["num_feat"], cfg["upscale"], cfg["upsampler"]
    if up in ("pixelshuffle", "nearest+conv"):
        spec.update(conv_spec("conv_before_upsample.0", e, nf))
    if up == "pixelshuffle":
        for k in range(int(math.log2(s))):
            spec.update(conv_spec(f"upsample.{2 * k}", nf, 4 * nf))
        spec.update(conv_spec("conv_last", nf, cin))
    elif up == "pixelshuffledirect":
        spec.update(conv_spec("upsample.0", e, cin * s * s))
    else:
        spec.update(conv_spec("conv_up1", nf, nf))
        if s == 4:
            spec.update(conv_spec("conv_up2", nf, nf))
        spec.update(conv_spec("conv_hr", nf, nf))
        spec.update(conv_spec("conv_last", nf, cin))
    sd = random_state_dict(spec, seed=seed)
    for i, depth in enumerate(cfg["depths"]):  # the buffers the original registers
        for j in range(depth):
            p = f"layers.{i}.residual_group.blocks.{j}"
            sd[f"{p}.attn.relative_position_index"] = official_relative_position_index(ws)
            if j % 2:
                sd[f"{p}.attn_mask"] = official_mask(img_size, img_size, ws, ws // 2)
    return sd


def swinir_official_forward(sd, x, cfg, img_size):
    """network_swinir.SwinIR.forward with the official keys (stored attn_mask at img_size, else computed)."""
    e, ws = cfg["embed_dim"], cfg["window_size"]
    h0, w0 = x.shape[2:]
    ph, pw = (ws - h0 % ws) % ws, (ws - w0 % ws) % ws
    x = F.pad(x, (0, pw, 0, ph), "reflect")
    x = (x - DIV2K_MEAN) * cfg["img_range"]

    def ln(t, name):
        return F.layer_norm(t, (e,), sd[f"{name}.weight"], sd[f"{name}.bias"])

    def lin(t, name):
        return F.linear(t, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def resi(t, name):
        if cfg["resi_connection"] == "1conv":
            return conv(t, sd, name)
        t = lrelu(conv(t, sd, f"{name}.0"))
        t = lrelu(conv(t, sd, f"{name}.2", padding=0))
        return conv(t, sd, f"{name}.4")

    first = conv(x, sd, "conv_first")
    b, _, h, w = first.shape
    t = ln(first.flatten(2).transpose(1, 2), "patch_embed.norm")
    for i, (depth, nh) in enumerate(zip(cfg["depths"], cfg["num_heads"])):
        layer_in = t
        for j in range(depth):
            p = f"layers.{i}.residual_group.blocks.{j}"
            shift = 0 if j % 2 == 0 else ws // 2
            shortcut = t
            y = ln(t, f"{p}.norm1").view(b, h, w, e)
            if shift:
                y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
            win = official_partition(y, ws).view(-1, ws * ws, e)
            bn, n, _ = win.shape
            qkv = lin(win, f"{p}.attn.qkv").reshape(bn, n, 3, nh, e // nh).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = (q * (e // nh) ** -0.5) @ k.transpose(-2, -1)
            table = sd[f"{p}.attn.relative_position_bias_table"]
            bias = table[sd[f"{p}.attn.relative_position_index"].view(-1)].view(n, n, -1).permute(2, 0, 1)
            attn = attn + bias.unsqueeze(0)
            if shift:
                mask = sd[f"{p}.attn_mask"] if (h, w) == (img_size, img_size) else official_mask(h, w, ws, shift)
                nw = mask.shape[0]
                attn = attn.view(bn // nw, nw, nh, n, n) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, nh, n, n)
            y = lin((attn.softmax(-1) @ v).transpose(1, 2).reshape(bn, n, e), f"{p}.attn.proj")
            y = official_reverse(y.view(-1, ws, ws, e), ws, h, w)
            if shift:
                y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
            t = shortcut + y.view(b, h * w, e)
            t = t + lin(F.gelu(lin(ln(t, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
        img = resi(t.transpose(1, 2).reshape(b, e, h, w), f"layers.{i}.conv")
        t = img.flatten(2).transpose(1, 2) + layer_in
    feat = ln(t, "norm").transpose(1, 2).reshape(b, e, h, w)
    feat = resi(feat, "conv_after_body") + first
    s, up = cfg["upscale"], cfg["upsampler"]
    if up == "pixelshuffle":
        y = F.leaky_relu(conv(feat, sd, "conv_before_upsample.0"), 0.01)
        for k in range(int(math.log2(s))):
            y = F.pixel_shuffle(conv(y, sd, f"upsample.{2 * k}"), 2)
        out = conv(y, sd, "conv_last")
    elif up == "pixelshuffledirect":
        out = F.pixel_shuffle(conv(feat, sd, "upsample.0"), s)
    else:
        y = F.leaky_relu(conv(feat, sd, "conv_before_upsample.0"), 0.01)
        y = lrelu(conv(F.interpolate(y, scale_factor=2, mode="nearest"), sd, "conv_up1"))
        if s == 4:
            y = lrelu(conv(F.interpolate(y, scale_factor=2, mode="nearest"), sd, "conv_up2"))
        out = conv(lrelu(conv(y, sd, "conv_hr")), sd, "conv_last")
    out = out / cfg["img_range"] + DIV2K_MEAN
    return out[:, :, : h0 * s, : w0 * s]


SWINIR_CASES = {
    "classical": {"upsampler": "pixelshuffle", "resi_connection": "1conv", "upscale": 2, "key": "params"},
    # num_feat is unused by pixelshuffledirect: the inferred config keeps the default
    "lightweight": {
        "upsampler": "pixelshuffledirect",
        "resi_connection": "1conv",
        "upscale": 3,
        "num_feat": 64,
        "key": "params",
    },
    "real": {"upsampler": "nearest+conv", "resi_connection": "1conv", "upscale": 4, "key": "params_ema"},
    "real_large": {
        "upsampler": "nearest+conv",
        "resi_connection": "3conv",
        "upscale": 4,
        "key": "params_ema",
    },
}


@pytest.mark.parametrize("task", list(SWINIR_CASES))
def test_swinir_official_layout(tmp_path, task):
    case = dict(SWINIR_CASES[task])
    key = case.pop("key")
    cfg = {
        "in_chans": 3,
        "embed_dim": 12,
        "depths": [2, 2],
        "num_heads": [2, 3],
        "window_size": 4,
        "mlp_ratio": 2.0,
        "qkv_bias": True,
        "patch_norm": True,
        "img_range": 1.0,
        "num_feat": 8,
        **case,
    }
    img_size = 8
    sd = swinir_official_state_dict(cfg, img_size)
    assert "layers.0.residual_group.blocks.1.attn_mask" in sd
    arch, detected = detect_architecture(sd)
    assert arch == "swinir"
    assert detected == cfg

    paths = save_both(tmp_path, f"swinir_{task}", {key: sd}, sd)
    x = torch.rand(1, 3, img_size, img_size)  # the size the stored attn_mask was made for
    model = check_loaded(paths, SwinIR, cfg, swinir_official_forward(sd, x, cfg, img_size), x)
    # another size (not a multiple of the window): padded, mask computed for that size
    x2 = torch.rand(2, 3, 10, 13)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x2).sample, swinir_official_forward(sd, x2, cfg, img_size), rtol=1e-5, atol=1e-5
        )
    # the dropped buffers are the ones our model recomputes, and they agree with the stored ones
    block = model.layers[0].residual_group.blocks[1]
    assert torch.equal(
        block.attn.relative_position_index,
        sd["layers.0.residual_group.blocks.1.attn.relative_position_index"],
    )
    assert torch.equal(
        model._attention_mask(8, 8, "cpu", torch.float32), sd["layers.0.residual_group.blocks.1.attn_mask"]
    )


def test_swinir_convert_drops_only_recomputed_buffers():
    cfg = {
        "embed_dim": 12,
        "depths": [2],
        "num_heads": [2],
        "window_size": 4,
        "mlp_ratio": 2.0,
        "upsampler": "pixelshuffle",
        "resi_connection": "1conv",
        "upscale": 4,
        "num_feat": 8,
    }
    sd = swinir_official_state_dict(cfg, 8)
    cls, config, converted = convert_state_dict(sd, arch="swinir")
    assert cls is SwinIR and config["upscale"] == 4
    assert set(sd) - set(converted) == {
        "layers.0.residual_group.blocks.0.attn.relative_position_index",
        "layers.0.residual_group.blocks.1.attn.relative_position_index",
        "layers.0.residual_group.blocks.1.attn_mask",
    }
    missing, unexpected = cls(**config).load_state_dict(converted, strict=False)
    assert not missing and not unexpected


# ----------------------------------------------------------------------------------------------
# SRVGGNetCompact
# ----------------------------------------------------------------------------------------------


def srvgg_spec(nf, nc, scale, prelu=True):
    spec = conv_spec("body.0", 3, nf)
    for i in range(nc):
        spec.update(conv_spec(f"body.{2 * i + 2}", nf, nf))
    if prelu:
        spec.update({f"body.{2 * i + 1}.weight": (nf,) for i in range(nc + 1)})
    spec.update(conv_spec(f"body.{2 * nc + 2}", nf, 3 * scale * scale))
    return spec


@pytest.mark.parametrize("scale", [2, 4])
def test_srvgg_params_layout(tmp_path, scale):
    nf, nc = 8, 3
    sd = random_state_dict(srvgg_spec(nf, nc, scale), seed=7)
    x = torch.rand(1, 3, 5, 7)
    out = x
    for i in range(nc + 1):
        out = F.prelu(conv(out, sd, f"body.{2 * i}"), sd[f"body.{2 * i + 1}.weight"])
    out = F.pixel_shuffle(conv(out, sd, f"body.{2 * nc + 2}"), scale)
    reference = out + F.interpolate(x, scale_factor=scale, mode="nearest")
    expected = {
        "num_in_ch": 3,
        "num_out_ch": 3,
        "num_feat": nf,
        "num_conv": nc,
        "upscale": scale,
        "act_type": "prelu",
    }
    assert detect_architecture(sd) == ("srvgg", expected)
    paths = save_both(tmp_path, "realesr-general-x4v3", {"params": sd}, sd)
    check_loaded(paths, SRVGGNetCompact, expected, reference, x)


def test_srvgg_without_prelu_defaults_to_relu_and_can_be_overridden():
    sd = random_state_dict(srvgg_spec(8, 2, 4, prelu=False))
    assert detect_architecture(sd)[1]["act_type"] == "relu"
    model = load_regression_model(sd, act_type="leakyrelu")
    assert isinstance(model.body[1], torch.nn.LeakyReLU)


# ----------------------------------------------------------------------------------------------
# our own layout, unwrapping
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        EDSR(num_feat=8, num_block=1, upscale=3, res_scale=1.0),
        RRDBNet(num_feat=8, num_block=1, num_grow_ch=4, scale=8),
        SwinIR(embed_dim=12, depths=(2,), num_heads=(3,), window_size=4, upscale=1, upsampler=""),
        SRVGGNetCompact(num_feat=8, num_conv=1, upscale=3),
    ],
    ids=lambda m: type(m).__name__,
)
def test_native_layout_and_diffusers_weights_file(tmp_path, model):
    """A ``save_pretrained`` weight file is itself a loadable checkpoint, with the same inferred config."""
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = load_regression_model(tmp_path / "diffusion_pytorch_model.safetensors")
    built = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if k[0] != "_"}
    got = {k: (list(v) if isinstance(v, tuple) else v) for k, v in loaded.config.items() if k[0] != "_"}
    assert got == built
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x).sample, loaded(x).sample)


def test_unwrap_state_dict_nesting_and_prefixes():
    t = torch.zeros(1)
    assert unwrap_state_dict({"params": {"a": t}, "params_ema": {"b": t}}) == {"b": t}
    assert unwrap_state_dict({"params": {"a": t}, "params_ema": {"b": t}}, key="params") == {"a": t}
    assert unwrap_state_dict({"state_dict": {"module.x.weight": t, "module.y": t}}) == {"x.weight": t, "y": t}
    assert unwrap_state_dict({"model": {"w": t}}) == {"w": t}
    assert unwrap_state_dict({"model.0.weight": t}) == {"model.0.weight": t}  # old ESRGAN keys are not nesting
    with pytest.raises(CheckpointError, match="not a state dict"):
        unwrap_state_dict([t])
    with pytest.raises(CheckpointError, match="'epoch'"):
        unwrap_state_dict({"w": t, "epoch": 3})
    with pytest.raises(CheckpointError, match="no 'params_ema' entry"):
        unwrap_state_dict({"w": t}, key="params_ema")


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def rrdb_x2_file(tmp_path):
    sd = random_state_dict(basicsr_rrdb_spec(8, 1, 4, 2))
    path = tmp_path / "RealESRGAN_x2plus.pth"
    torch.save({"params_ema": sd}, path)
    return path, sd


def test_wrong_architecture_and_scale(rrdb_x2_file):
    path, sd = rrdb_x2_file
    message = f"checkpoint {path} is an RRDBNet x2 model, but scale=4 was requested"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_regression_model(path, scale=4)
    with pytest.raises(CheckpointError, match=r"is an RRDBNet x2 model, but arch='swinir' was requested"):
        load_regression_model(path, arch="swinir")
    with pytest.raises(CheckpointError, match=r"is an RRDBNet x2 model, but arch='edsr'"):
        convert_state_dict(sd, arch="edsr")
    model = load_regression_model(path, arch="realesrgan", scale=2)
    assert isinstance(model, RRDBNet) and model.upscale == 2
    with pytest.raises(TypeError, match="no hyper-parameter"):
        load_regression_model(path, res_scale=0.1)


def test_missing_and_unexpected_keys(rrdb_x2_file):
    _, sd = rrdb_x2_file
    extra = {**sd, "body.0.rdb1.conv6.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected keys 'body.0.rdb1.conv6.weight'"):
        load_regression_model(extra)
    missing = {k: v for k, v in sd.items() if k != "conv_hr.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys 'conv_hr.bias'"):
        convert_state_dict(missing)
    wrong = {**sd, "conv_hr.weight": torch.zeros(8, 8, 1, 1)}
    with pytest.raises(CheckpointError, match=r"shape mismatches .*conv_hr.weight"):
        load_regression_model(wrong)
    with pytest.raises(CheckpointError, match="not recognised"):
        detect_architecture({"foo.weight": torch.zeros(1)})


def test_file_errors(tmp_path, rrdb_x2_file):
    path, sd = rrdb_x2_file
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pth")

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth is empty \(0 bytes\)"):
        load_regression_model(empty)

    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth is not a checkpoint"):
        load_state_dict(text)

    data = path.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth could not be read \(truncated or corrupt\?\)"):
        load_state_dict(truncated)

    st = tmp_path / "model.safetensors"
    save_file(sd, st)
    st_truncated = tmp_path / "truncated.safetensors"
    st_truncated.write_bytes(st.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors is not a readable safetensors file"):
        load_state_dict(st_truncated)

    unsafe = tmp_path / "with_args.pth"
    torch.save({"params": sd, "args": argparse.Namespace(scale=2)}, unsafe)
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace .*unsafe unpickling"):
        load_state_dict(unsafe)

    not_sd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_sd)
    with pytest.raises(CheckpointError, match=r"list\.pth is not a state dict"):
        load_state_dict(not_sd)

    with pytest.raises(CheckpointError, match="is a directory"):
        load_state_dict(tmp_path)

    misnamed = tmp_path / "really_a_pth.safetensors"
    misnamed.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"really_a_pth\.safetensors is not a readable safetensors file"):
        load_state_dict(misnamed)
    # content decides for other suffixes: safetensors saved as .bin loads, safely
    as_bin = tmp_path / "model.bin"
    as_bin.write_bytes(st.read_bytes())
    assert load_state_dict(as_bin).keys() == sd.keys()


def test_detect_accepts_wrapped_dicts(rrdb_x2_file):
    _, sd = rrdb_x2_file
    assert detect_architecture({"params_ema": {f"module.{k}": v for k, v in sd.items()}})[0] == "rrdbnet"


class _RunsCode:
    """Unpickling this runs ``os.system`` (a harmless ``true`` here): what a malicious checkpoint does."""

    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_code_running_pickles_are_refused_plainly(tmp_path, capsys):
    """A checkpoint holding a code-running object (torch >= 2.6 words it ``Trying to load unsupported GLOBAL
    posix.system``), or a plain pickle, is refused with a message that says so, and never suggests
    ``weights_only=False``; the CLI prints it as one line."""
    import pickle

    from sr_diffusion.cli import main

    torch.save({"params": {"w": torch.zeros(1)}, "payload": _RunsCode()}, tmp_path / "evil.pth")
    (tmp_path / "evil.pkl.pth").write_bytes(pickle.dumps({"payload": _RunsCode()}, protocol=4))
    for name, what in (("evil.pth", r"a pickled (posix|nt)\.system object"), ("evil.pkl.pth", "pickled Python")):
        with pytest.raises(CheckpointError) as info:
            load_state_dict(tmp_path / name)
        message = str(info.value)
        assert re.search(f"{re.escape(name)} holds {what}", message), message
        assert "is refused: loading it would need unsafe unpickling, which can execute code" in message
        assert "weights_only" not in message and "truncated" not in message
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "evil.pth"), str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "execute code" in line and not (tmp_path / "out").exists()
