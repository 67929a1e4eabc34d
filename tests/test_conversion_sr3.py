"""Converter for the SR3 checkpoints of Janspiry's re-implementation (Image-Super-Resolution-via-Iterative-Refinement).

The original layout is written here from a reading of its code (``model/sr3_modules/unet.py``, ``diffusion.py``,
``model/model.py``'s ``save_network``), not by building our model: key names and shapes of ``UNet``, a functional
forward over those names (the original's einsum attention, WaveGrad encoding, FiLM shift), the noise-schedule
buffers of ``GaussianDiffusion`` and its ``p_sample_loop``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sr_diffusion.checkpoints import CheckpointError
from sr_diffusion.cli import main
from sr_diffusion.conversion.sr3 import (
    RELEASED_CONFIGS,
    convert_sr3_pipeline,
    convert_sr3_scheduler,
    convert_sr3_unet,
    infer_sr3_unet_config,
)
from sr_diffusion.models.sr3_unet import SR3UNet
from sr_diffusion.pipelines import AutoSRPipeline, SR3Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


# ----------------------------------------------------------------------------------------------
# the original layout: UNet keys and shapes, its forward, GaussianDiffusion's buffers and sampler
# ----------------------------------------------------------------------------------------------

# every hyper-parameter of the original UNet, for a tiny model (image_size 128 and attention at level 1: what the
# converter infers for a file that matches no released config)
TINY = {
    "in_channel": 6,
    "out_channel": 3,
    "inner_channel": 32,
    "norm_groups": 32,
    "channel_mults": [1, 2],
    "attn_res": [64],
    "res_blocks": 1,
    "dropout": 0.0,
    "with_noise_level_emb": True,
    "image_size": 128,
    "use_affine_level": False,
}


def original_shapes(cfg: dict) -> dict[str, tuple]:
    """``{key: shape}`` of the original ``UNet(**cfg).state_dict()``, in its order."""
    shapes: dict[str, tuple] = {}
    c = cfg["inner_channel"]
    emb = cfg["with_noise_level_emb"]

    def conv(p, cin, cout, k, bias=True):
        shapes[f"{p}.weight"] = (cout, cin, k, k)
        if bias:
            shapes[f"{p}.bias"] = (cout,)

    def norm(p, ch):
        shapes[f"{p}.weight"] = shapes[f"{p}.bias"] = (ch,)

    def block(p, cin, cout):  # Block: GroupNorm, Swish, Dropout/Identity, Conv3x3
        norm(f"{p}.block.0", cin)
        conv(f"{p}.block.3", cin, cout, 3)

    def resnet_with_attn(p, cin, cout, attn):  # ResnetBlocWithAttn
        r = f"{p}.res_block"
        if emb:
            width = cout * (2 if cfg["use_affine_level"] else 1)
            shapes[f"{r}.noise_func.noise_func.0.weight"] = (width, c)
            shapes[f"{r}.noise_func.noise_func.0.bias"] = (width,)
        block(f"{r}.block1", cin, cout)
        block(f"{r}.block2", cout, cout)
        if cin != cout:
            conv(f"{r}.res_conv", cin, cout, 1)
        if attn:
            norm(f"{p}.attn.norm", cout)
            conv(f"{p}.attn.qkv", cout, 3 * cout, 1, bias=False)
            conv(f"{p}.attn.out", cout, cout, 1)

    if emb:  # PositionalEncoding, Linear, Swish, Linear
        shapes.update({"noise_level_mlp.1.weight": (4 * c, c), "noise_level_mlp.1.bias": (4 * c,)})
        shapes.update({"noise_level_mlp.3.weight": (c, 4 * c), "noise_level_mlp.3.bias": (c,)})
    conv("downs.0", cfg["in_channel"], c, 3)
    feats, pre, res, i = [c], c, cfg["image_size"], 1
    mults = cfg["channel_mults"]
    for ind, mult in enumerate(mults):
        attn = res in cfg["attn_res"]
        for _ in range(cfg["res_blocks"]):
            resnet_with_attn(f"downs.{i}", pre, c * mult, attn)
            pre = c * mult
            feats.append(pre)
            i += 1
        if ind != len(mults) - 1:
            conv(f"downs.{i}.conv", pre, pre, 3)
            feats.append(pre)
            res, i = res // 2, i + 1
    resnet_with_attn("mid.0", pre, pre, True)
    resnet_with_attn("mid.1", pre, pre, False)
    i = 0
    for ind in reversed(range(len(mults))):
        attn = res in cfg["attn_res"]
        for _ in range(cfg["res_blocks"] + 1):
            resnet_with_attn(f"ups.{i}", pre + feats.pop(), c * mults[ind], attn)
            pre = c * mults[ind]
            i += 1
        if ind:
            conv(f"ups.{i}.conv", pre, pre, 3)
            res, i = res * 2, i + 1
    block("final_conv", pre, cfg["out_channel"])
    return shapes


def original_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in original_shapes(cfg).items():
        if ".block.0.weight" in key or key.endswith("attn.norm.weight"):
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.2 * torch.randn(shape, generator=g)
    return sd


def original_forward(sd: dict, cfg: dict, x: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
    """The original ``UNet.forward(x, noise_level)`` with ``noise_level`` ``(B, 1)``, functionally on its keys."""
    groups = cfg["norm_groups"]

    def swish(h):
        return h * torch.sigmoid(h)

    def conv(h, p, **kwargs):
        return F.conv2d(h, sd[f"{p}.weight"], sd.get(f"{p}.bias"), **kwargs)

    def gn(h, p):
        return F.group_norm(h, groups, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)

    def block(h, p):
        return conv(swish(gn(h, f"{p}.block.0")), f"{p}.block.3", padding=1)

    def resnet(h, p, t):
        out = block(h, f"{p}.block1")
        if t is not None:
            film = F.linear(t, sd[f"{p}.noise_func.noise_func.0.weight"], sd[f"{p}.noise_func.noise_func.0.bias"])
            film = film.view(h.shape[0], -1, 1, 1)
            if cfg["use_affine_level"]:
                gamma, beta = film.chunk(2, dim=1)
                out = (1 + gamma) * out + beta
            else:
                out = out + film
        out = block(out, f"{p}.block2")
        return out + (conv(h, f"{p}.res_conv") if f"{p}.res_conv.weight" in sd else h)

    def attention(h, p):  # SelfAttention, n_head = 1
        b, c, hh, ww = h.shape
        qkv = conv(gn(h, f"{p}.norm"), f"{p}.qkv").view(b, 1, 3 * c, hh, ww)
        q, k, v = qkv.chunk(3, dim=2)
        attn = torch.einsum("bnchw, bncyx -> bnhwyx", q, k) / math.sqrt(c)
        attn = torch.softmax(attn.reshape(b, 1, hh, ww, -1), -1).view(b, 1, hh, ww, hh, ww)
        out = torch.einsum("bnhwyx, bncyx -> bnchw", attn, v)
        return conv(out.reshape(b, c, hh, ww), f"{p}.out") + h

    def layer(h, p, t):
        h = resnet(h, f"{p}.res_block", t)
        return attention(h, f"{p}.attn") if f"{p}.attn.qkv.weight" in sd else h

    t = None
    if cfg["with_noise_level_emb"]:  # PositionalEncoding (WaveGrad): noise_level (B, 1) -> (B, 1, C)
        count = cfg["inner_channel"] // 2
        step = torch.arange(count, dtype=noise_level.dtype) / count
        enc = noise_level.unsqueeze(1) * torch.exp(-math.log(1e4) * step.unsqueeze(0))
        enc = torch.cat([torch.sin(enc), torch.cos(enc)], dim=-1)
        t = F.linear(
            swish(F.linear(enc, sd["noise_level_mlp.1.weight"], sd["noise_level_mlp.1.bias"])),
            sd["noise_level_mlp.3.weight"],
            sd["noise_level_mlp.3.bias"],
        )

    n_downs = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("downs."))
    n_ups = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("ups."))
    feats, h = [], x
    for i in range(n_downs):
        if i == 0:
            h = conv(h, "downs.0", padding=1)
        elif f"downs.{i}.conv.weight" in sd:
            h = conv(h, f"downs.{i}.conv", stride=2, padding=1)
        else:
            h = layer(h, f"downs.{i}", t)
        feats.append(h)
    h = layer(layer(h, "mid.0", t), "mid.1", t)
    for i in range(n_ups):
        if f"ups.{i}.conv.weight" in sd:
            h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"ups.{i}.conv", padding=1)
        else:
            h = layer(torch.cat((h, feats.pop()), dim=1), f"ups.{i}", t)
    return block(h, "final_conv")


def original_schedule_buffers(schedule: str, n: int, start: float, end: float) -> dict[str, torch.Tensor]:
    """``GaussianDiffusion.set_new_noise_schedule``'s buffers (numpy float64, saved as float32)."""
    if schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64)
    elif schedule == "quad":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    elif schedule == "warmup10":
        betas = end * np.ones(n, dtype=np.float64)
        betas[: int(n * 0.1)] = np.linspace(start, end, int(n * 0.1), dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in buffers.items()}


def gen_pth(cfg: dict = TINY, seed: int = 0, schedule=("linear", 8, 1e-4, 0.2)) -> dict[str, torch.Tensor]:
    """What ``save_network`` writes: ``GaussianDiffusion.state_dict()``: ``denoise_fn.*`` and the schedule."""
    sd = {f"denoise_fn.{k}": v for k, v in original_state_dict(cfg, seed).items()}
    return {**sd, **original_schedule_buffers(*schedule)} if schedule else sd


def unet_inputs(n: int = 2, size: tuple[int, int] = (8, 12)):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 6, *size, generator=g)
    gamma = torch.rand(n, 1, generator=g) * 0.9 + 0.05
    return x, gamma


# ----------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------


def test_original_layout_literal_keys():
    """Counts and shapes of the released models, read off the original code."""
    shapes = original_shapes(RELEASED_CONFIGS["sr_sr3_16_128"])
    assert len(shapes) == 362 and sum(math.prod(s) for s in shapes.values()) == 97_807_491
    assert shapes["noise_level_mlp.3.weight"] == (64, 256)
    assert shapes["downs.3.conv.weight"] == (64, 64, 3, 3)  # two blocks, then the downsampler
    assert shapes["downs.10.attn.qkv.weight"] == (1536, 512, 1, 1)  # level 3 (16x16 of 128): attention, no bias
    assert "downs.10.attn.qkv.bias" not in shapes and "downs.4.attn.qkv.weight" not in shapes
    assert shapes["ups.0.res_block.block1.block.3.weight"] == (512, 1024, 3, 3)
    assert shapes["ups.3.conv.weight"] == (512, 512, 3, 3)
    assert shapes["ups.1.res_block.noise_func.noise_func.0.weight"] == (512, 64)
    assert shapes["final_conv.block.3.weight"] == (3, 64, 3, 3)
    shapes = original_shapes(RELEASED_CONFIGS["sr_sr3_64_512"])
    assert len(shapes) == 229 and sum(math.prod(s) for s in shapes.values()) == 155_334_339
    assert not any(".attn." in k for k in shapes if not k.startswith("mid.0"))


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        RELEASED_CONFIGS["sr_sr3_16_128"],
        RELEASED_CONFIGS["sr_sr3_64_512"],
        {**TINY, "use_affine_level": True, "res_blocks": 2, "channel_mults": [1, 1, 2], "attn_res": [128, 32]},
        {**TINY, "with_noise_level_emb": False},
    ],
    ids=["tiny", "16_128", "64_512", "affine", "no-emb"],
)
def test_model_keys_equal_original_keys(cfg):
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in SR3UNet(**cfg).state_dict().items()}
    assert ours == original_shapes(cfg)


# ----------------------------------------------------------------------------------------------
# conversion: file forms, inferred configs, outputs
# ----------------------------------------------------------------------------------------------

WRAPPERS = {
    "gen.pth": lambda sd: sd,
    "no-prefix": lambda sd: {k.removeprefix("denoise_fn."): v for k, v in sd.items()},  # the schedule beside
    "unet-only": lambda sd: {k[len("denoise_fn.") :]: v for k, v in sd.items() if k.startswith("denoise_fn.")},
    "data-parallel": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "netG": lambda sd: {f"netG.{k}": v for k, v in sd.items()},
    "netG.module": lambda sd: {f"netG.module.{k}": v for k, v in sd.items()},
    "state_dict": lambda sd: {"state_dict": sd},
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_convert_file_forms_and_outputs(tmp_path, wrapper):
    sd = gen_pth()
    wrapped = WRAPPERS[wrapper](sd)
    torch.save(wrapped, tmp_path / "I10_E1_gen.pth")
    sources = [tmp_path / "I10_E1_gen.pth", wrapped]
    if wrapper in ("gen.pth", "netG"):
        from safetensors.torch import save_file

        save_file(wrapped, str(tmp_path / "gen.safetensors"))
        sources.append(tmp_path / "gen.safetensors")

    x, gamma = unet_inputs()
    original = original_state_dict(TINY)
    reference = original_forward(original, TINY, x, gamma)
    # like with like: a batch of one against the original's batch of one (a batch of two may round differently)
    reference_one = original_forward(original, TINY, x[:1], gamma[:1])
    for source in sources:
        model, config = convert_sr3_unet(source)  # strict: no missing or unexpected key
        assert config == TINY and not model.training
        with torch.no_grad():
            torch.testing.assert_close(model(x, gamma).sample, reference, rtol=0, atol=1e-5)  # (B, 1), as the original
            torch.testing.assert_close(model(x, gamma[:, 0]).sample, reference, rtol=0, atol=1e-5)
            torch.testing.assert_close(model(x[:1], gamma[0, 0].item()).sample, reference_one, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_affine_level": True},
        {"attn_res": []},
        {"channel_mults": [1, 2, 1], "res_blocks": 2, "attn_res": [128, 32]},
        {"channel_mults": [1], "res_blocks": 3, "attn_res": [128]},
        {"out_channel": 1, "in_channel": 4},
        {"with_noise_level_emb": False},
    ],
    ids=["affine", "no-attn", "three-levels", "one-level", "channels", "no-emb"],
)
def test_inferred_config_and_outputs(overrides):
    cfg = {**TINY, **overrides}
    sd = original_state_dict(cfg, seed=1)
    assert infer_sr3_unet_config(sd) == cfg
    model, config = convert_sr3_unet(sd)
    assert config == cfg
    g = torch.Generator().manual_seed(5)
    x, gamma = torch.randn(2, cfg["in_channel"], 8, 8, generator=g), torch.rand(2, 1, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(x, gamma).sample, original_forward(sd, cfg, x, gamma), rtol=0, atol=1e-5)


def test_released_configs_are_recognised():
    """The released structures take their config's norm_groups, dropout and image_size (shapes only: meta)."""
    for name, cfg in RELEASED_CONFIGS.items():
        sd = {k: torch.empty(s, device="meta") for k, s in original_shapes(cfg).items()}
        assert infer_sr3_unet_config(sd) == cfg, name
        assert infer_sr3_unet_config(sd, norm_groups=8)["norm_groups"] == 8
    # the 64->512 structure with another width is no released model: the defaults
    cfg = {**RELEASED_CONFIGS["sr_sr3_64_512"], "inner_channel": 32}
    sd = {k: torch.empty(s, device="meta") for k, s in original_shapes(cfg).items()}
    assert infer_sr3_unet_config(sd) == {**cfg, "norm_groups": 32, "image_size": 128}


def test_norm_groups_and_image_size_overrides():
    cfg = {**TINY, "inner_channel": 16, "norm_groups": 8}  # 32 does not divide 16: it must be given
    sd = original_state_dict(cfg)
    with pytest.raises(CheckpointError, match=r"norm_groups is not stored .* --norm-groups"):
        convert_sr3_unet(sd)
    model, config = convert_sr3_unet(sd, config={"norm_groups": 8})
    assert config == cfg
    x, gamma = unet_inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, gamma).sample, original_forward(sd, cfg, x, gamma), rtol=0, atol=1e-5)
    _, config = convert_sr3_unet(sd, config={"norm_groups": 8, "image_size": 32})
    assert (config["image_size"], config["attn_res"]) == (32, [16])  # attention stays at level 1
    with pytest.raises(TypeError, match=r"no hyper-parameter\(s\) \['groups'\]"):
        convert_sr3_unet(sd, config={"groups": 8})


def test_schedule_from_the_saved_buffers():
    ref = original_schedule_buffers("linear", 2000, 1e-6, 1e-2)
    scheduler = convert_sr3_scheduler(ref)
    c = scheduler.config
    assert (c.num_train_timesteps, c.beta_schedule, c.beta_start, c.beta_end) == (2000, "linear", 1e-6, 1e-2)
    assert (c.prediction_type, c.clip_sample, c.variance_type) == ("epsilon", True, "fixed_small")
    torch.testing.assert_close(scheduler.alphas_cumprod, ref["alphas_cumprod"], rtol=2e-4, atol=1e-7)
    # none saved: the released configs' schedule (the same)
    assert dict(convert_sr3_scheduler(None).config) == dict(c)
    quad = convert_sr3_scheduler(original_schedule_buffers("quad", 100, 1e-4, 2e-2))
    assert (quad.config.beta_schedule, quad.config.beta_start, quad.config.beta_end) == ("scaled_linear", 1e-4, 2e-2)
    warmup = original_schedule_buffers("warmup10", 100, 1e-4, 2e-2)
    scheduler = convert_sr3_scheduler(warmup)
    assert scheduler.config.trained_betas is not None
    torch.testing.assert_close(scheduler.betas, warmup["betas"])
    with pytest.raises(CheckpointError, match="alphas_cumprod is not the cumulative product"):
        convert_sr3_scheduler({**warmup, "alphas_cumprod": warmup["alphas_cumprod"] * 0.5})


# ----------------------------------------------------------------------------------------------
# the converted pipeline samples as the original
# ----------------------------------------------------------------------------------------------


def original_super_resolution(sd: dict, buffers: dict, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``GaussianDiffusion.p_sample_loop`` (conditional, all steps), with the noise drawn from ``generator``."""
    img = torch.randn(x.shape, generator=generator)
    sqrt_ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), buffers["alphas_cumprod"].double()]).sqrt()
    for t in reversed(range(len(buffers["betas"]))):
        noise_level = torch.tensor([[sqrt_ab_prev[t + 1].item()]], dtype=torch.float32).repeat(x.shape[0], 1)
        eps = original_forward(sd, TINY, torch.cat([x, img], dim=1), noise_level)
        x_recon = buffers["sqrt_recip_alphas_cumprod"][t] * img - buffers["sqrt_recipm1_alphas_cumprod"][t] * eps
        x_recon = x_recon.clamp(-1.0, 1.0)
        mean = buffers["posterior_mean_coef1"][t] * x_recon + buffers["posterior_mean_coef2"][t] * img
        noise = torch.randn(img.shape, generator=generator) if t > 0 else torch.zeros_like(img)
        img = mean + noise * (0.5 * buffers["posterior_log_variance_clipped"][t]).exp()
    return img


def test_converted_pipeline_samples_as_the_original(tmp_path):
    """The whole chain (8 DDPM steps) against the original sampler with the same noise; then save / load."""
    torch.save(gen_pth(), tmp_path / "I10_E1_gen.pth")
    pipe = convert_sr3_pipeline(tmp_path / "I10_E1_gen.pth", upscale=4)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.unet, SR3UNet) and pipe.noise_level_scale == 1.0 and pipe.upscale == 4
    assert pipe.scheduler.config.num_train_timesteps == 8

    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    lr = torch.rand(1, 3, 3, 4, generator=torch.Generator().manual_seed(0))
    out = pipe(lr, num_inference_steps=8, generator=torch.Generator().manual_seed(1), output_type="pt").images
    buffers = original_schedule_buffers("linear", 8, 1e-4, 0.2)
    # the UNet sees sqrt(alpha_bar_t) itself, as the original (its sqrt_alphas_cumprod_prev[t + 1])
    torch.testing.assert_close(torch.cat(seen), buffers["sqrt_alphas_cumprod"].flip(0), rtol=1e-5, atol=1e-6)

    # the condition as the original's data pipeline makes it: PIL bicubic on the 8-bit LR image, read back as k/255
    rgb = (lr[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    up = np.asarray(Image.fromarray(rgb, mode="RGB").resize((16, 12), Image.BICUBIC)).copy()
    x = torch.from_numpy(up).permute(2, 0, 1)[None].float().div(255) * 2 - 1
    expected = original_super_resolution(original_state_dict(TINY), buffers, x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, ((expected.clamp(-1, 1) + 1) / 2), rtol=0, atol=1e-4)

    pipe.save_pretrained(tmp_path / "pipe")
    for loaded in (SR3Pipeline.from_pretrained(tmp_path / "pipe"), AutoSRPipeline.from_pretrained(tmp_path / "pipe")):
        assert type(loaded) is SR3Pipeline and type(loaded.unet) is SR3UNet
        assert loaded.noise_level_scale == 1.0
        assert {k: v for k, v in loaded.unet.config.items() if not k.startswith("_")} == TINY
        loaded.set_progress_bar_config(disable=True)
        again = loaded(lr, num_inference_steps=8, generator=torch.Generator().manual_seed(1), output_type="pt")
        torch.testing.assert_close(again.images, out, rtol=0, atol=1e-5)
    # odd sizes are padded to the UNet's multiple and cropped back
    odd = pipe(torch.rand(1, 3, 5, 3), num_inference_steps=2, output_type="pt").images
    assert odd.shape == (1, 3, 20, 12)


# ----------------------------------------------------------------------------------------------
# command line and errors
# ----------------------------------------------------------------------------------------------


def test_cli_convert_auto_detects_sr3(tmp_path, capsys):
    torch.save({f"module.{k}": v for k, v in gen_pth().items()}, tmp_path / "I10_E1_gen.pth")
    assert main(["convert", str(tmp_path / "I10_E1_gen.pth"), str(tmp_path / "out")]) == 0
    assert "SR3Pipeline x8" in capsys.readouterr().out  # both released models are x8
    pipe = AutoSRPipeline.from_pretrained(tmp_path / "out")
    assert isinstance(pipe, SR3Pipeline) and isinstance(pipe.unet, SR3UNet) and pipe.noise_level_scale == 1.0
    assert (pipe.scheduler.config.num_train_timesteps, pipe.scheduler.config.beta_end) == (8, 0.2)

    cfg = {**TINY, "inner_channel": 16, "norm_groups": 8}
    torch.save(gen_pth(cfg, schedule=None), tmp_path / "small_gen.pth")
    args = ["convert", str(tmp_path / "small_gen.pth")]
    assert main([*args, str(tmp_path / "o1")]) == 2  # norm_groups must be given
    assert "--norm-groups" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "o2"), "--arch", "sr3", "--scale", "4", "--norm-groups", "8"]) == 0
    pipe = AutoSRPipeline.from_pretrained(tmp_path / "o2")
    assert pipe.upscale == 4 and pipe.unet.config.norm_groups == 8
    assert pipe.scheduler.config.num_train_timesteps == 2000  # no saved schedule: the released one
    assert not (tmp_path / "o1").exists()


def test_corrupt_and_mismatched_checkpoints(tmp_path, capsys):
    sd = gen_pth()
    path = tmp_path / "I10_E1_gen.pth"
    torch.save(sd, path)
    path.write_bytes(path.read_bytes()[:2000])  # truncated
    with pytest.raises(CheckpointError, match="could not be read"):
        convert_sr3_unet(path)
    # a key missing, a shape changed, a stray key
    with pytest.raises(CheckpointError, match=r"missing keys 'ups.1.res_block.block2.block.3.weight'"):
        convert_sr3_unet({k: v for k, v in sd.items() if k != "denoise_fn.ups.1.res_block.block2.block.3.weight"})
    bad = {**sd, "denoise_fn.mid.0.attn.out.weight": torch.zeros(64, 64, 3, 3)}
    with pytest.raises(CheckpointError, match=r"shape mismatches .*mid.0.attn.out.weight"):
        convert_sr3_unet(bad)
    with pytest.raises(CheckpointError, match=r"keys 'ema_step' are neither the SR3 UNet's"):
        convert_sr3_unet({**sd, "ema_step": torch.tensor(1)})
    with pytest.raises(CheckpointError, match="several SR3 UNets"):
        convert_sr3_unet({**sd, **{f"ema.{k}": v for k, v in sd.items()}})
    # another model: the DDPM variant of the same repository, a regression network
    ddpm = {
        "denoise_fn.time_mlp.1.weight": torch.zeros(128, 32),
        "denoise_fn.downs.1.res_block.mlp.1.weight": sd["denoise_fn.noise_level_mlp.1.weight"],
    }
    with pytest.raises(CheckpointError, match="DDPM UNet .* not its SR3 UNet"):
        convert_sr3_unet(ddpm)
    with pytest.raises(CheckpointError, match="is not an SR3 UNet state dict"):
        convert_sr3_unet({"conv_first.weight": torch.zeros(8, 3, 3, 3)})
    torch.save({"optimizer": {"state": {}}, "iter": 10}, tmp_path / "I10_E1_opt.pth")
    with pytest.raises(CheckpointError, match="optimizer state: pass the matching"):
        convert_sr3_unet(tmp_path / "I10_E1_opt.pth")

    # the command line: one line each, nothing written
    torch.save(ddpm, tmp_path / "ddpm_gen.pth")
    assert main(["convert", str(path), str(tmp_path / "o1")]) == 2
    assert main(["convert", str(tmp_path / "ddpm_gen.pth"), str(tmp_path / "o2")]) == 2
    assert main(["convert", str(tmp_path / "ddpm_gen.pth"), str(tmp_path / "o3"), "--arch", "sr3"]) == 2
    torch.save(sd, tmp_path / "good_gen.pth")
    assert main(["convert", str(tmp_path / "good_gen.pth"), str(tmp_path / "o4"), "--preset", "v3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
    assert "DDPM UNet" in err[2] and "for ResShift checkpoints" in err[3]
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
