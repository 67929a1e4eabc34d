"""Converters for the released ResShift checkpoints: the Swin-UNet denoiser and the LDM VQ-f4 autoencoder.

The original layouts are written here from a reading of the official code (``models/unet.py``
``UNetModelSwin``, ``models/swin_transformer.py``, ``ldm/modules/diffusionmodules/model.py``), not by
building our models: key names, shapes, the saved buffers (``relative_position_index``, ``attn_mask``) and
functional forwards of single blocks against those names.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sr_diffusion.checkpoints import CheckpointError
from sr_diffusion.conversion import convert_resshift_unet, convert_vq_f4, infer_resshift_unet_config
from sr_diffusion.models.resshift_unet import ResShiftUNet, resshift_window_mask

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


# ----------------------------------------------------------------------------------------------
# the original UNetModelSwin layout
# ----------------------------------------------------------------------------------------------

# every hyper-parameter, as the released yaml files spell them (lists), for a tiny model
TINY = {
    "image_size": 16,
    "in_channels": 3,
    "model_channels": 32,
    "out_channels": 3,
    "num_res_blocks": [1, 1],
    "attention_resolutions": [16, 8],
    "dropout": 0.0,
    "channel_mult": [1, 2],
    "conv_resample": True,
    "dims": 2,
    "use_fp16": False,
    "num_heads": 1,
    "num_head_channels": 16,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "swin_depth": 2,
    "swin_embed_dim": 32,
    "window_size": 4,
    "mlp_ratio": 2.0,
    "patch_norm": False,
    "cond_lq": True,
    "cond_mask": False,
    "lq_size": 16,
}


def original_window_mask(res: int, ws: int, shift: int) -> torch.Tensor:
    """``SwinTransformerBlock.calculate_mask`` as the released code runs it: the mask image is created as
    ``(1, 1, H, W)`` but indexed as ``[:, h, w, :]``, and the windows are flattened after a
    ``permute(0, 2, 3, 1)`` of ``(nW, ws, ws, 1)``."""
    img_mask = torch.zeros((1, 1, res, res))
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    cnt = 0
    for h in cuts:
        for w in cuts:
            img_mask[:, h, w, :] = cnt
            cnt += 1
    n = res // ws
    windows = img_mask.view(1, 1, n, ws, n, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, ws, ws, 1)
    windows = windows.permute(0, 2, 3, 1).reshape(-1, ws * ws)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def original_relative_position_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]


def original_unet_shapes(cfg: dict) -> dict[str, tuple]:
    """``{key: shape}`` of ``UNetModelSwin(**cfg).state_dict()`` (buffers included), from the original code."""
    shapes: dict[str, tuple] = {}
    mc, emb = cfg["model_channels"], 4 * cfg["model_channels"]
    heads = cfg["swin_embed_dim"] // cfg["num_head_channels"]
    big = cfg["window_size"]

    def add(prefix, **entries):
        for name, shape in entries.items():
            shapes[f"{prefix}.{name.replace('__', '.')}"] = shape

    def resblock(p, cin, cout):
        add(p, in_layers__0__weight=(cin,), in_layers__0__bias=(cin,))
        add(p, in_layers__2__weight=(cout, cin, 3, 3), in_layers__2__bias=(cout,))
        e = 2 * cout if cfg["use_scale_shift_norm"] else cout
        add(p, emb_layers__1__weight=(e, emb), emb_layers__1__bias=(e,))
        add(p, out_layers__0__weight=(cout,), out_layers__0__bias=(cout,))
        add(p, out_layers__3__weight=(cout, cout, 3, 3), out_layers__3__bias=(cout,))
        if cin != cout:
            add(p, skip_connection__weight=(cout, cin, 1, 1), skip_connection__bias=(cout,))

    def swin(p, ch, res):
        ws, shift = min(big, res), (big // 2 if res > big else 0)
        e, hid = cfg["swin_embed_dim"], int(cfg["swin_embed_dim"] * cfg["mlp_ratio"])
        add(p, patch_embed__proj__weight=(e, ch, 1, 1), patch_embed__proj__bias=(e,))
        add(p, patch_unembed__proj__weight=(ch, e, 1, 1), patch_unembed__proj__bias=(ch,))
        if cfg["patch_norm"]:
            add(p, patch_embed__norm__weight=(e,), patch_embed__norm__bias=(e,))
            add(p, patch_unembed__norm__weight=(ch,), patch_unembed__norm__bias=(ch,))
        for b in range(cfg["swin_depth"]):
            q = f"{p}.blocks.{b}"
            add(q, norm1__weight=(e,), norm1__bias=(e,), norm2__weight=(e,), norm2__bias=(e,))
            add(q, attn__relative_position_bias_table=((2 * ws - 1) ** 2, heads))
            add(q, attn__relative_position_index=(ws * ws, ws * ws))
            add(q, attn__qkv__weight=(3 * e, e), attn__qkv__bias=(3 * e,), attn__proj__weight=(e, e))
            add(q, attn__proj__bias=(e,), mlp__fc1__weight=(hid, e, 1, 1), mlp__fc1__bias=(hid,))
            add(q, mlp__fc2__weight=(e, hid, 1, 1), mlp__fc2__bias=(e,))
            if b % 2 and shift:
                add(q, attn_mask=((res // ws) ** 2, ws * ws, ws * ws))

    add("time_embed", **{"0__weight": (emb, mc), "0__bias": (emb,), "2__weight": (emb, emb), "2__bias": (emb,)})
    lq_ch = 4 if cfg["cond_mask"] else 3
    stages = (cfg["lq_size"] // cfg["image_size"]).bit_length() - 1
    width = 16
    for s in range(stages):
        add("feature_extractor", **{f"{3 * s}__weight": (width, lq_ch, 3, 3), f"{3 * s}__bias": (width,)})
        add("feature_extractor", **{f"{3 * s + 2}__op__weight": (2 * width, width, 3, 3)})
        add("feature_extractor", **{f"{3 * s + 2}__op__bias": (2 * width,)})
        lq_ch = width = 2 * width
    ch = mc * cfg["channel_mult"][0]
    add("input_blocks.0.0", weight=(ch, cfg["in_channels"] + lq_ch, 3, 3), bias=(ch,))
    skips, i, ds = [ch], 1, cfg["image_size"]
    for level, mult in enumerate(cfg["channel_mult"]):
        for j in range(cfg["num_res_blocks"][level]):
            resblock(f"input_blocks.{i}.0", ch, mult * mc)
            ch = mult * mc
            if ds in cfg["attention_resolutions"] and j == 0:
                swin(f"input_blocks.{i}.1", ch, ds)
            skips.append(ch)
            i += 1
        if level < len(cfg["channel_mult"]) - 1:
            if cfg["resblock_updown"]:
                resblock(f"input_blocks.{i}.0", ch, ch)
            elif cfg["conv_resample"]:
                add(f"input_blocks.{i}.0.op", weight=(ch, ch, 3, 3), bias=(ch,))
            skips.append(ch)
            i, ds = i + 1, ds // 2
    resblock("middle_block.0", ch, ch)
    swin("middle_block.1", ch, ds)
    resblock("middle_block.2", ch, ch)
    i = 0
    for level in reversed(range(len(cfg["channel_mult"]))):
        mult = cfg["channel_mult"][level]
        for j in range(cfg["num_res_blocks"][level] + 1):
            resblock(f"output_blocks.{i}.0", ch + skips.pop(), mult * mc)
            ch, k = mult * mc, 1
            if ds in cfg["attention_resolutions"] and j == 0:
                swin(f"output_blocks.{i}.1", ch, ds)
                k = 2
            if level and j == cfg["num_res_blocks"][level]:
                if cfg["resblock_updown"]:
                    resblock(f"output_blocks.{i}.{k}", ch, ch)
                elif cfg["conv_resample"]:
                    add(f"output_blocks.{i}.{k}.conv", weight=(ch, ch, 3, 3), bias=(ch,))
                ds *= 2
            i += 1
    add("out", **{"0__weight": (ch,), "0__bias": (ch,), "2__weight": (cfg["out_channels"], ch, 3, 3)})
    add("out", **{"2__bias": (cfg["out_channels"],)})
    return shapes


def original_unet_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the original layout; the two buffers hold what the original computes."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in original_unet_shapes(cfg).items():
        if key.endswith("relative_position_index"):
            sd[key] = original_relative_position_index(int(round(shape[0] ** 0.5)))
        elif key.endswith("attn_mask"):
            ws = int(round(shape[1] ** 0.5))
            sd[key] = original_window_mask(int(round(shape[0] ** 0.5)) * ws, ws, ws // 2)
        elif key.endswith(
            ("norm1.weight", "norm2.weight", "in_layers.0.weight", "out_layers.0.weight", "out.0.weight")
        ):
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
    return sd


def params_only(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.endswith(("attn_mask", "relative_position_index"))}


def unet_inputs(cfg: dict, n: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(3)
    r = cfg["lq_size"] // cfg["image_size"]
    x = torch.randn(n, cfg["in_channels"], size, size, generator=g)
    lq = torch.rand(n, 3, size * r, size * r, generator=g) * 2 - 1
    mask = torch.rand(n, 1, size * r, size * r, generator=g).round() * 2 - 1 if cfg["cond_mask"] else None
    return x, lq, mask


# ----------------------------------------------------------------------------------------------
# ResShift UNet: layout, file forms, inference
# ----------------------------------------------------------------------------------------------


def test_original_layout_literal_keys():
    """A few names and shapes read directly off the original code for the tiny config."""
    shapes = original_unet_shapes(TINY)
    assert shapes["input_blocks.0.0.weight"] == (32, 6, 3, 3)  # x_t (3) + LR image (3)
    assert shapes["input_blocks.1.1.blocks.1.attn_mask"] == (16, 16, 16)  # 16x16 level, 4x4 windows
    assert shapes["input_blocks.2.0.op.weight"] == (32, 32, 3, 3)
    assert shapes["input_blocks.3.0.skip_connection.weight"] == (64, 32, 1, 1)
    assert shapes["middle_block.1.blocks.1.attn_mask"] == (4, 16, 16)
    assert shapes["output_blocks.1.1.conv.weight"] == (64, 64, 3, 3)  # no Swin at j=1: the upsampler is .1
    assert shapes["output_blocks.2.0.in_layers.2.weight"] == (32, 96, 3, 3)
    assert shapes["output_blocks.3.0.emb_layers.1.weight"] == (64, 128)
    assert len(shapes) == 269


def test_model_keys_equal_original_keys_minus_recomputed_buffers():
    for cfg in (
        TINY,
        {**TINY, "lq_size": 64, "cond_mask": True},
        {**TINY, "resblock_updown": True, "patch_norm": True, "use_scale_shift_norm": False},
        {**TINY, "conv_resample": False, "num_res_blocks": [2, 1], "attention_resolutions": [8]},
    ):
        with torch.device("meta"):
            ours = {k: tuple(v.shape) for k, v in ResShiftUNet(**cfg).state_dict().items()}
        original = original_unet_shapes(cfg)
        assert ours == {k: v for k, v in original.items() if not k.endswith(("attn_mask", "relative_position_index"))}


WRAPPERS = {
    "raw": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "iters_start": torch.tensor(5)},
    "params_ema": lambda sd: {"params_ema": sd},
    "model": lambda sd: {"model": sd},
    "ddp": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "ddp+compile": lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_convert_released_file_forms(tmp_path, wrapper):
    sd = original_unet_state_dict(TINY)
    wrapped = WRAPPERS[wrapper](sd)
    torch.save(wrapped, tmp_path / "resshift.pth")
    sources = [tmp_path / "resshift.pth", wrapped]
    if wrapper in ("raw", "ddp", "ddp+compile"):
        from safetensors.torch import save_file

        save_file(wrapped, str(tmp_path / "resshift.safetensors"))
        sources.append(tmp_path / "resshift.safetensors")

    reference = ResShiftUNet(**TINY).eval()
    reference.load_state_dict(params_only(sd), strict=True)
    x, lq, _ = unet_inputs(TINY)
    with torch.no_grad():
        expected = reference(x, torch.tensor([1, 4]), lq=lq).sample
    for source in sources:
        model, config = convert_resshift_unet(source)
        assert config == TINY
        assert not model.training
        with torch.no_grad():
            torch.testing.assert_close(model(x, torch.tensor([1, 4]), lq=lq).sample, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"lq_size": 32, "cond_mask": True},  # inpainting: 4-channel lq, one extractor stage
        {"lq_size": 64, "in_channels": 4, "out_channels": 4},  # face: larger latent, two stages
        {"resblock_updown": True, "use_scale_shift_norm": False, "patch_norm": True},
        {"conv_resample": False, "num_res_blocks": [2, 1], "attention_resolutions": [8]},
        {"channel_mult": [1, 2, 2], "num_res_blocks": [1, 2, 1], "attention_resolutions": [16, 4]},
        {"swin_depth": 3, "mlp_ratio": 1.5, "num_head_channels": 8},
    ],
)
def test_inferred_config_and_outputs(overrides):
    cfg = {**TINY, **overrides}
    sd = original_unet_state_dict(cfg, seed=1)
    assert infer_resshift_unet_config(sd) == cfg
    model, config = convert_resshift_unet(sd)
    assert config == cfg
    reference = ResShiftUNet(**cfg).eval()
    reference.load_state_dict(params_only(sd), strict=True)
    x, lq, mask = unet_inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, 7, lq=lq, mask=mask).sample, reference(x, 7, lq=lq, mask=mask).sample, rtol=0, atol=0
        )


def test_image_size_without_stored_masks_and_override():
    """Without attn_mask buffers the smallest consistent image_size is assumed (window · 2^(levels-1));
    ``config`` overrides it."""
    cfg = {**TINY, "image_size": 8, "attention_resolutions": [8, 4], "lq_size": 8}
    sd = params_only(original_unet_state_dict(cfg))
    assert infer_resshift_unet_config(sd) == cfg
    stripped = params_only(original_unet_state_dict(TINY))
    _, config = convert_resshift_unet(stripped, config={"image_size": 16})
    assert config == TINY
    with pytest.raises(TypeError, match=r"no hyper-parameter\(s\) \['img_size'\]"):
        convert_resshift_unet(stripped, config={"img_size": 16})


# ----------------------------------------------------------------------------------------------
# ResShift UNet: building blocks against functional references on the original names
# ----------------------------------------------------------------------------------------------


def test_window_mask_is_the_original_one():
    for res, ws in ((16, 4), (8, 4), (4, 4), (64, 8), (24, 8)):
        torch.testing.assert_close(resshift_window_mask(res, res, ws, ws // 2), original_window_mask(res, ws, ws // 2))
    # the original's quirk: only the last row of windows is split, by the token's column in its window
    mask = resshift_window_mask(8, 8, 4, 2)
    assert mask[:2].abs().sum() == 0 and mask[2:].abs().sum() > 0
    assert mask[3, 0, 1] == 0 and mask[3, 0, 2] == -100.0 and mask[3, 0, 4] == 0


def ref_resblock(sd: dict, p: str, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """ResBlock.forward with use_scale_shift_norm, written against the original parameter names."""

    def gn(t, name):
        return F.group_norm(t, 32, sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"], eps=1e-5)

    h = F.conv2d(F.silu(gn(x, "in_layers.0")), sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[:, :, None, None]
    scale, shift = e.chunk(2, dim=1)
    h = F.silu(gn(h, "out_layers.0") * (1 + scale) + shift)
    h = F.conv2d(h, sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1)
    skip = x
    if f"{p}.skip_connection.weight" in sd:
        skip = F.conv2d(x, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
    return skip + h


def ref_swin_block(sd: dict, p: str, x: torch.Tensor, ws: int, shift: int, heads: int) -> torch.Tensor:
    """SwinTransformerBlock.forward on (B, C, H, W), written against the original names and buffers."""
    b, c, height, width = x.shape

    def gn(t, name):
        return F.group_norm(t, 32, sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"], eps=1e-5)

    h = gn(x, "norm1")
    if shift:
        h = torch.roll(h, shifts=(-shift, -shift), dims=(2, 3))
    win = h.view(b, c, height // ws, ws, width // ws, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, c)
    n = ws * ws
    qkv = F.linear(win, sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"])
    q, k, v = qkv.reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    index = sd[f"{p}.attn.relative_position_index"].view(-1)
    attn = attn + sd[f"{p}.attn.relative_position_bias_table"][index].view(n, n, -1).permute(2, 0, 1)
    if shift:
        mask = sd[f"{p}.attn_mask"]
        attn = (attn.view(b, mask.shape[0], heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c)
    out = F.linear(out, sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
    out = out.view(b, height // ws, width // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(2, 3))
    x = x + out
    h = F.gelu(F.conv2d(gn(x, "norm2"), sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"]))
    return x + F.conv2d(h, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])


def test_blocks_match_functional_references():
    sd = original_unet_state_dict(TINY, seed=2)
    model, _ = convert_resshift_unet(sd)
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(2, 128, generator=g)
    x = torch.randn(2, 32, 16, 16, generator=g)
    with torch.no_grad():
        # ResBlock 32 → 64 channels with scale-shift norm and a 1x1 skip
        torch.testing.assert_close(
            model.input_blocks[3][0](x, emb), ref_resblock(sd, "input_blocks.3.0", x, emb), rtol=1e-5, atol=1e-5
        )
        # shifted Swin block (the stored attn_mask) on its training size, and unshifted, 2 heads
        tokens = torch.randn(2, 32, 16, 16, generator=g)
        for j, shift in ((0, 0), (1, 2)):
            p = f"input_blocks.1.1.blocks.{j}"
            ours = model.input_blocks[1][1].blocks[j](tokens)
            torch.testing.assert_close(ours, ref_swin_block(sd, p, tokens, 4, shift, 2), rtol=1e-5, atol=1e-5)
        # the shifted block at another size: the mask the original computes for that size
        wide = torch.randn(1, 32, 8, 24, generator=g)
        sd_wide = {**sd, "input_blocks.1.1.blocks.1.attn_mask": resshift_window_mask(8, 24, 4, 2)}
        torch.testing.assert_close(
            model.input_blocks[1][1].blocks[1](wide),
            ref_swin_block(sd_wide, "input_blocks.1.1.blocks.1", wide, 4, 2, 2),
            rtol=1e-5,
            atol=1e-5,
        )


# ----------------------------------------------------------------------------------------------
# ResShift UNet: errors
# ----------------------------------------------------------------------------------------------


def test_unet_conversion_errors(tmp_path):
    sd = original_unet_state_dict(TINY)
    missing = {k: v for k, v in sd.items() if k != "output_blocks.3.0.in_layers.2.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys 'output_blocks\.3\.0\.in_layers\.2\.bias'"):
        convert_resshift_unet(missing)
    with pytest.raises(CheckpointError, match=r"unexpected keys 'input_blocks\.1\.0\.extra\.weight'"):
        convert_resshift_unet({**sd, "input_blocks.1.0.extra.weight": torch.zeros(1)})
    bad_shape = {**sd, "middle_block.1.blocks.0.attn.qkv.bias": torch.zeros(95)}
    with pytest.raises(
        CheckpointError, match=r"shape mismatches .*middle_block\.1\.blocks\.0\.attn\.qkv\.bias: \(95,\)"
    ):
        convert_resshift_unet(bad_shape)
    # a mask from code that follows the Swin paper is not what the released code computes
    key = "input_blocks.1.1.blocks.1.attn_mask"
    with pytest.raises(CheckpointError, match=r"attn_mask is not the shifted-window mask of the released"):
        convert_resshift_unet({**sd, key: torch.zeros_like(sd[key])})
    with pytest.raises(CheckpointError, match=r"image_size=32 gives \(64, 16, 16\)"):
        convert_resshift_unet(sd, config={"image_size": 32})
    with pytest.raises(CheckpointError, match=r"not a ResShift UNetModelSwin state dict: it has no 'time_embed\.0"):
        convert_resshift_unet({"conv_first.weight": torch.zeros(4, 3, 3, 3)})
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty"):
        convert_resshift_unet(tmp_path / "empty.pth")


# ----------------------------------------------------------------------------------------------
# VQ-f4 autoencoder (LDM layout → diffusers.VQModel)
# ----------------------------------------------------------------------------------------------


def ldm_vq_shapes(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(), z=3, embed_dim=3, n_embed=16):
    """``{key: shape}`` of ``VQModelTorch`` (``ldm.models.autoencoder``) for ``double_z=False``."""
    shapes = {}

    def norm(p, c):
        shapes[f"{p}.weight"], shapes[f"{p}.bias"] = (c,), (c,)

    def conv(p, cin, cout, k):
        shapes[f"{p}.weight"], shapes[f"{p}.bias"] = (cout, cin, k, k), (cout,)

    def resnet(p, cin, cout):
        norm(f"{p}.norm1", cin), conv(f"{p}.conv1", cin, cout, 3), norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.nin_shortcut", cin, cout, 1)

    def attn(p, c):
        norm(f"{p}.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{name}", c, c, 1)

    conv("encoder.conv_in", 3, ch, 3)
    cin = ch
    for i, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if i in attn_levels:
                attn(f"encoder.down.{i}.attn.{j}", cin)
        if i < len(ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    for part in ("encoder", "decoder"):
        c = ch * ch_mult[-1]
        resnet(f"{part}.mid.block_1", c, c), attn(f"{part}.mid.attn_1", c), resnet(f"{part}.mid.block_2", c, c)
    norm("encoder.norm_out", cin), conv("encoder.conv_out", cin, z, 3)
    conv("decoder.conv_in", z, ch * ch_mult[-1], 3)
    cin = ch * ch_mult[-1]
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, ch * ch_mult[i])
            cin = ch * ch_mult[i]
            if i in attn_levels:
                attn(f"decoder.up.{i}.attn.{j}", cin)
        if i:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin), conv("decoder.conv_out", cin, 3, 3)
    conv("quant_conv", z, embed_dim, 1), conv("post_quant_conv", embed_dim, z, 1)
    shapes["quantize.embedding.weight"] = (n_embed, embed_dim)
    return shapes


def ldm_vq_state_dict(seed=0, **kwargs) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: (1 + 0.1 * torch.randn(s, generator=g))
        if "norm" in k and k.endswith("weight")
        else 0.1 * torch.randn(s, generator=g)
        for k, s in ldm_vq_shapes(**kwargs).items()
    }


def ref_ldm_attention(sd: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    """LDM ``AttnBlock``: single-head self-attention over H·W with 1×1-conv q, k, v, proj_out."""
    b, c, height, width = x.shape
    h = F.group_norm(x, 32, sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], eps=1e-6)
    q, k, v = (F.conv2d(h, sd[f"{p}.{n}.weight"], sd[f"{p}.{n}.bias"]).flatten(2) for n in ("q", "k", "v"))
    w = torch.softmax(q.transpose(1, 2) @ k * c**-0.5, dim=2)  # b, hw (query), hw (key)
    out = (v @ w.transpose(1, 2)).view(b, c, height, width)
    return x + F.conv2d(out, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])


def test_vq_f4_against_diffusers_conversion_and_functional_quantizer(tmp_path):
    from diffusers import VQModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = ldm_vq_state_dict()
    torch.save(sd, tmp_path / "autoencoder_vq_f4.pth")
    model = convert_vq_f4(tmp_path / "autoencoder_vq_f4.pth")
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    assert config["block_out_channels"] == [32, 64] and config["layers_per_block"] == 1
    assert (config["latent_channels"], config["vq_embed_dim"], config["num_vq_embeddings"]) == (3, 3, 16)
    assert config["down_block_types"] == ["DownEncoderBlock2D"] * 2
    assert config["scaling_factor"] == 1.0 and config["mid_block_add_attention"]

    # diffusers' own LDM → diffusers VAE mapping (it leaves the codebook alone) gives the same model
    theirs = convert_ldm_vae_checkpoint(dict(sd), dict(config))
    theirs["quantize.embedding.weight"] = sd["quantize.embedding.weight"]
    reference = VQModel(**config).eval()
    reference.load_state_dict(theirs, strict=True)

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        h = model.encode(x).latents
        torch.testing.assert_close(h, reference.encode(x).latents, rtol=0, atol=0)
        decoded = model.decode(h).sample
        torch.testing.assert_close(decoded, reference.decode(h).sample, rtol=0, atol=0)

        # VQModelTorch.encode = quant_conv(encoder(x)); decode = decoder(post_quant_conv(nearest code))
        features = model.encoder(x)
        expected_h = F.conv2d(features, sd["quant_conv.weight"], sd["quant_conv.bias"])
        torch.testing.assert_close(h, expected_h, rtol=1e-5, atol=1e-5)
        codebook = sd["quantize.embedding.weight"]
        flat = h.permute(0, 2, 3, 1).reshape(-1, 3)
        nearest = ((flat[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)
        quantized = codebook[nearest].view(2, 8, 8, 3).permute(0, 3, 1, 2)
        torch.testing.assert_close(model.quantize(h)[0], quantized, rtol=1e-6, atol=1e-6)
        post = F.conv2d(quantized, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])
        # (the straight-through z + (z_q - z) of the quantizer rounds in the last bits; the decoder amplifies)
        torch.testing.assert_close(decoded, model.decoder(post), rtol=1e-4, atol=5e-5)
        # the mid-block attention is the LDM AttnBlock
        mid = torch.randn(2, 64, 4, 4)
        torch.testing.assert_close(
            model.encoder.mid_block.attentions[0](mid),
            ref_ldm_attention(sd, "encoder.mid.attn_1", mid),
            rtol=1e-5,
            atol=1e-5,
        )
    assert decoded.shape == x.shape


def test_vq_with_level_attention_and_wrappers():
    sd = ldm_vq_state_dict(seed=1, attn_levels=(1,), z=4, embed_dim=3)
    model = convert_vq_f4({"state_dict": {f"module.{k}": v for k, v in sd.items()}})
    assert list(model.config.down_block_types) == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    assert list(model.config.up_block_types) == ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encoder.down_blocks[1].attentions[0](x),
            ref_ldm_attention(sd, "encoder.down.1.attn.0", x),
            rtol=1e-5,
            atol=1e-5,
        )
        # decoder level 1 (LDM up.1) is diffusers' first up block
        torch.testing.assert_close(
            model.decoder.up_blocks[0].attentions[1](x),
            ref_ldm_attention(sd, "decoder.up.1.attn.1", x),
            rtol=1e-5,
            atol=1e-5,
        )
        assert model.decode(model.encode(torch.rand(1, 3, 8, 8)).latents).sample.shape == (1, 3, 8, 8)


def test_vq_conversion_errors():
    sd = ldm_vq_state_dict()
    with pytest.raises(
        CheckpointError, match=r"not part of an LDM VQ autoencoder \(VQModel\): 'encoder\.down\.0\.extra\.weight'"
    ):
        convert_vq_f4({**sd, "encoder.down.0.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"missing keys 'decoder\.mid_block\.attentions\.0\.to_q\.bias'"):
        convert_vq_f4({k: v for k, v in sd.items() if k != "decoder.mid.attn_1.q.bias"})
    with pytest.raises(CheckpointError, match=r"shape mismatches .*post_quant_conv\.weight"):
        convert_vq_f4({**sd, "post_quant_conv.weight": torch.zeros(3, 4, 1, 1)})
    # ResShift's face VQ-f8 has num_res_blocks=[1, 2, 3, 4]: not one layers_per_block
    uneven = {k: v for k, v in sd.items() if not k.startswith("encoder.down.1.block.")}
    uneven.update(
        {k: v for k, v in ldm_vq_state_dict(num_res_blocks=2).items() if k.startswith("encoder.down.1.block.")}
    )
    with pytest.raises(CheckpointError, match=r"\[1, 2\] residual blocks per encoder level"):
        convert_vq_f4(uneven)
    kl = {**sd, "encoder.conv_out.weight": torch.zeros(6, 64, 3, 3), "encoder.conv_out.bias": torch.zeros(6)}
    with pytest.raises(CheckpointError, match=r"double_z \(KL\) encoder"):
        convert_vq_f4(kl)
    # Lightning checkpoints carry the training loss (LPIPS, discriminator): dropped
    convert_vq_f4({"state_dict": {**sd, "loss.discriminator.main.0.weight": torch.zeros(1)}})


def test_released_files_assemble_into_a_working_pipeline(tmp_path):
    """The README's recipe: released denoiser + VQ-f4 files -> ResShiftPipeline -> save -> AutoSRPipeline."""
    from sr_diffusion.pipelines import AutoSRPipeline, ResShiftPipeline
    from sr_diffusion.schedulers import ResShiftScheduler

    torch.save({"state_dict": original_unet_state_dict(TINY)}, tmp_path / "resshift.pth")
    torch.save({"state_dict": ldm_vq_state_dict(ch_mult=(1, 2, 2))}, tmp_path / "vq_f4.pth")
    unet, _ = convert_resshift_unet(tmp_path / "resshift.pth")
    pipe = ResShiftPipeline(
        unet=unet, scheduler=ResShiftScheduler.from_preset("v3"), vae=convert_vq_f4(tmp_path / "vq_f4.pth")
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.upscale == 4 and pipe.vae_scale_factor == 4
    lr = torch.rand(1, 3, 12, 20, generator=torch.Generator().manual_seed(0))
    out = pipe(lr, color_fix="wavelet", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 48, 80) and torch.isfinite(out).all()
    pipe.save_pretrained(tmp_path / "pipe")
    again = AutoSRPipeline.from_pretrained(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    assert isinstance(again, ResShiftPipeline)
    out2 = again(lr, color_fix="wavelet", generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(out2, out, atol=1e-4, rtol=0)
