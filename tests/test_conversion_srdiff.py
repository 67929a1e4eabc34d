"""Converter for the released SRDiff checkpoints (``LeiaLi/SRDiff``).

The original layout is written here from a reading of the official code (``models/diffsr_modules.py`` ``Unet`` and
``RRDBNet``, ``models/commons.py``, ``models/diffusion.py`` ``GaussianDiffusion``, ``utils/utils.py``
``save_checkpoint``), not by building our models: the key names and shapes, the schedule buffers, a functional forward
of the RRDB encoder and of the UNet against those names, and the original's DDPM sampling loop (``p_sample``,
``res2img``). The converted pipeline must give the same noise predictions and the same samples.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sr_diffusion.checkpoints import CheckpointError
from sr_diffusion.conversion.srdiff import convert_srdiff_pipeline, infer_srdiff_config
from sr_diffusion.pipelines import AutoSRPipeline, SRDiffPipeline
from sr_diffusion.pipelines.srdiff.pipeline_srdiff import srdiff_encode
from sr_diffusion.resize import imresize

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


# ----------------------------------------------------------------------------------------------------------------------
# the original layout: hparams, key names and shapes, schedule buffers
# ----------------------------------------------------------------------------------------------------------------------

# the hparams the original reads, tiny (the released models: hidden_size 64, rrdb_num_feat 32, rrdb_num_block 8)
HPARAMS = {
    "x4": {
        "hidden_size": 16,
        "unet_dim_mults": "1|2|3",
        "rrdb_num_feat": 8,
        "rrdb_num_block": 5,
        "sr_scale": 4,
        "use_attn": False,
        "up_input": False,
        "use_wn": False,
        "beta_schedule": "cosine",
        "timesteps": 100,
    },
    "x8-attn-upinput-wn-linear": {
        "hidden_size": 16,
        "unet_dim_mults": "1|2",
        "rrdb_num_feat": 8,
        "rrdb_num_block": 2,
        "sr_scale": 8,
        "use_attn": True,
        "up_input": True,
        "use_wn": True,
        "beta_schedule": "linear",
        "timesteps": 20,
    },
}


def original_cosine_betas(timesteps: int, s: float = 0.008) -> np.ndarray:
    """``models/diffusion.py`` ``cosine_beta_schedule``, literally (its ``linspace(0, steps, steps)`` included)."""
    steps = timesteps + 1
    x = np.linspace(0, steps, steps)
    alphas_cumprod = np.cos(((x / steps) + s) / (1 + s) * np.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return np.clip(betas, a_min=0, a_max=0.999)


def original_betas(hp) -> np.ndarray:
    if hp["beta_schedule"] == "cosine":
        return original_cosine_betas(hp["timesteps"])
    betas = np.linspace(0.0001, 0.02, hp["timesteps"], dtype=np.float64)  # get_beta_schedule('linear'), beta_end
    betas[-1] = 0.999  # hparams['res']
    return betas


def original_buffers(hp) -> dict[str, torch.Tensor]:
    """``GaussianDiffusion.__init__``'s registered buffers (float64 numpy, stored as float32)."""
    betas = original_betas(hp)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def original_rrdb_shapes(hp) -> dict[str, tuple]:
    """``RRDBNet(3, 3, nf, nb, gc=nf // 2)`` of ``models/diffsr_modules.py`` (as ``tasks/srdiff.py`` builds it)."""
    nf, nb = hp["rrdb_num_feat"], hp["rrdb_num_block"]
    gc = nf // 2
    shapes = {"conv_first": (nf, 3)}
    for i in range(nb):
        for r in (1, 2, 3):
            for k in range(1, 5):
                shapes[f"RRDB_trunk.{i}.RDB{r}.conv{k}"] = (gc, nf + (k - 1) * gc)
            shapes[f"RRDB_trunk.{i}.RDB{r}.conv5"] = (nf, nf + 4 * gc)
    ups = ["upconv1", "upconv2"] + (["upconv3"] if hp["sr_scale"] == 8 else [])
    shapes.update({name: (nf, nf) for name in ["trunk_conv", *ups, "HRconv"]})
    shapes["conv_last"] = (3, nf)
    out = {}
    for name, (c_out, c_in) in shapes.items():
        out[f"{name}.weight"] = (c_out, c_in, 3, 3)
        out[f"{name}.bias"] = (c_out,)
    return out


def original_unet_shapes(hp) -> dict[str, tuple]:
    """``Unet(hidden_size, out_dim=3, cond_dim=rrdb_num_feat, dim_mults)`` of ``models/diffsr_modules.py``
    (``groups=0``: no GroupNorm), every parameter and its shape."""
    dim, s = hp["hidden_size"], hp["sr_scale"]
    mults = [int(m) for m in hp["unet_dim_mults"].split("|")]
    dims = [3, *(dim * m for m in mults)]
    in_out = list(zip(dims[:-1], dims[1:]))
    shapes: dict[str, tuple] = {}

    def conv(name, c_out, c_in, k):
        if hp["use_wn"]:  # torch.nn.utils.weight_norm on every Conv2d: weight_g (c_out, 1, 1, 1), weight_v
            shapes[f"{name}.weight_g"] = (c_out, 1, 1, 1)
            shapes[f"{name}.weight_v"] = (c_out, c_in, k, k)
        else:
            shapes[f"{name}.weight"] = (c_out, c_in, k, k)
        shapes[f"{name}.bias"] = (c_out,)

    def resnet(name, c_in, c_out):
        shapes[f"{name}.mlp.1.weight"] = (c_out, dim)
        shapes[f"{name}.mlp.1.bias"] = (c_out,)
        conv(f"{name}.block1.block.1", c_out, c_in, 3)
        conv(f"{name}.block2.block.1", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.res_conv", c_out, c_in, 1)

    num_cond = (hp["rrdb_num_block"] + 1) // 3
    shapes["cond_proj.weight"] = (hp["rrdb_num_feat"] * num_cond, dim, 2 * s, 2 * s)  # ConvTranspose2d: not normed
    shapes["cond_proj.bias"] = (dim,)
    shapes.update({"mlp.0.weight": (4 * dim, dim), "mlp.0.bias": (4 * dim,), "mlp.2.weight": (dim, 4 * dim)})
    shapes["mlp.2.bias"] = (dim,)
    for i, (c_in, c_out) in enumerate(in_out):
        resnet(f"downs.{i}.0", c_in, c_out)
        resnet(f"downs.{i}.1", c_out, c_out)
        if i < len(in_out) - 1:
            conv(f"downs.{i}.2.conv.1", c_out, c_out, 3)
    mid = dims[-1]
    resnet("mid_block1", mid, mid)
    if hp["use_attn"]:
        shapes["mid_attn.fn.g"] = (1,)
        if hp["use_wn"]:
            shapes["mid_attn.fn.fn.to_qkv.weight_g"] = (384, 1, 1, 1)
            shapes["mid_attn.fn.fn.to_qkv.weight_v"] = (384, mid, 1, 1)
        else:
            shapes["mid_attn.fn.fn.to_qkv.weight"] = (384, mid, 1, 1)
        conv("mid_attn.fn.fn.to_out", mid, 128, 1)
    resnet("mid_block2", mid, mid)
    for i, (c_in, c_out) in enumerate(reversed(in_out[1:])):
        resnet(f"ups.{i}.0", c_out * 2, c_in)
        resnet(f"ups.{i}.1", c_in, c_in)
        shapes[f"ups.{i}.2.conv.0.weight"] = (c_in, c_in, 4, 4)  # ConvTranspose2d
        shapes[f"ups.{i}.2.conv.0.bias"] = (c_in,)
    conv("final_conv.0.block.1", dim, dim, 3)
    conv("final_conv.1", 3, dim, 1)
    if hp["up_input"]:
        conv("up_proj.1", dim, 3, 3)
    return shapes


def original_state_dict(hp, seed: int = 0) -> dict[str, torch.Tensor]:
    """``GaussianDiffusion.state_dict()``: ``denoise_fn.*``, ``rrdb.*`` and the schedule buffers; random weights
    scaled by ``1/sqrt(fan_in)`` (weight-norm gains below 1, biases small, gates non-zero)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, shapes in (("denoise_fn.", original_unet_shapes(hp)), ("rrdb.", original_rrdb_shapes(hp))):
        for name, shape in shapes.items():
            value = torch.randn(shape, generator=g)
            if name.endswith("weight_g"):  # row norms in [0.6, 1): activations stay O(1) through the layers
                value = 0.6 + 0.4 * torch.rand(shape, generator=g)
            elif len(shape) > 1:
                fan_in = shape[0] * shape[2] * shape[3] if "cond_proj" in name or ".2.conv.0" in name else 0
                fan_in = fan_in or math.prod(shape[1:])
                value = value / math.sqrt(fan_in)
            else:
                value = value * 0.1 if not name.endswith(".g") else value * 0.5 + 1.0
            sd[prefix + name] = value
    sd.update(original_buffers(hp))
    return sd


def test_original_layout_literal_keys():
    """A few keys spelled out literally, as they appear in the released checkpoints."""
    hp = {**HPARAMS["x4"], "hidden_size": 64, "unet_dim_mults": "1|2|3|4", "rrdb_num_feat": 32, "rrdb_num_block": 8}
    unet, rrdb = original_unet_shapes(hp), original_rrdb_shapes(hp)
    assert unet["cond_proj.weight"] == (96, 64, 8, 8)  # 32 features x (8 + 1) // 3 maps, kernel 2s
    assert unet["downs.0.0.block1.block.1.weight"] == (64, 3, 3, 3) and unet["downs.2.2.conv.1.weight"][0] == 192
    assert unet["ups.0.0.block1.block.1.weight"] == (192, 512, 3, 3) and "downs.3.2.conv.1.weight" not in unet
    assert unet["final_conv.1.weight"] == (3, 64, 1, 1) and unet["mlp.2.weight"] == (64, 256)
    assert rrdb["RRDB_trunk.7.RDB3.conv5.weight"] == (32, 96, 3, 3) and rrdb["HRconv.weight"] == (32, 32, 3, 3)
    # cond_proj 2, mlp 4, downs 8 ResnetBlocks (6 each, 4 with res_conv +2) + 3 downsamplers 2, mid 2 x 6,
    # ups 3 x (6 + 2 res_conv + 6 + 2 upsampler), final_conv 4
    assert len(unet) == 2 + 4 + (8 * 6 + 4 * 2 + 3 * 2) + 12 + 3 * 16 + 4


# ----------------------------------------------------------------------------------------------------------------------
# the original's forward passes, functional, on its own key names
# ----------------------------------------------------------------------------------------------------------------------


def _w(sd, name):
    if f"{name}.weight_v" in sd:  # torch's own weight-norm kernel
        return torch._weight_norm(sd[f"{name}.weight_v"], sd[f"{name}.weight_g"], 0)
    return sd[f"{name}.weight"]


def _mish(x):
    return x * torch.tanh(F.softplus(x))


def ref_rrdb(sd, x, sr_scale):
    """``RRDBNet.forward(x, get_fea=True)``: x in [-1, 1] → (out in [-1, 1], feas)."""

    def c(name, h):
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)

    lrelu = lambda h: F.leaky_relu(h, 0.2)
    x = (x + 1) / 2
    fea_first = fea = c("conv_first", x)
    feas = []
    nb = len({k.split(".")[1] for k in sd if k.startswith("RRDB_trunk.")})
    for i in range(nb):
        out = fea
        for r in (1, 2, 3):
            p = f"RRDB_trunk.{i}.RDB{r}"
            xs = [out]
            for k in range(1, 5):
                xs.append(lrelu(c(f"{p}.conv{k}", torch.cat(xs, 1))))
            out = c(f"{p}.conv5", torch.cat(xs, 1)) * 0.2 + out
        fea = out * 0.2 + fea
        feas.append(fea)
    fea = fea_first + c("trunk_conv", fea)
    feas.append(fea)
    for name in ["upconv1", "upconv2"] + (["upconv3"] if sr_scale == 8 else []):
        fea = lrelu(c(name, F.interpolate(fea, scale_factor=2, mode="nearest")))
    out = c("conv_last", lrelu(c("HRconv", fea)))
    return out.clamp(0, 1) * 2 - 1, feas


def ref_unet(sd, hp, x, time, cond, img_lr_up):
    """``Unet.forward(x, time, cond, img_lr_up)`` with ``hparams['res'] = True``."""
    dim, s = hp["hidden_size"], hp["sr_scale"]

    def conv(name, h, pad=0, stride=1):  # [ReflectionPad2d(pad)], Conv2d
        if pad:
            h = F.pad(h, (pad,) * 4, mode="reflect")
        return F.conv2d(h, _w(sd, name), sd[f"{name}.bias"], stride=stride)

    def block(name, h):  # Block(groups=0): ReflectionPad2d(1), Conv2d(3), Mish
        return _mish(conv(f"{name}.block.1", h, pad=1))

    def resnet(name, h, t):
        out = block(f"{name}.block1", h)
        out = out + F.linear(_mish(t), sd[f"{name}.mlp.1.weight"], sd[f"{name}.mlp.1.bias"])[:, :, None, None]
        out = block(f"{name}.block2", out)
        return out + (conv(f"{name}.res_conv", h) if f"{name}.res_conv.bias" in sd else h)

    half = dim // 2
    freqs = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
    emb = time[:, None] * freqs[None, :]
    t = torch.cat((emb.sin(), emb.cos()), dim=-1)
    t = F.linear(_mish(F.linear(t, sd["mlp.0.weight"], sd["mlp.0.bias"])), sd["mlp.2.weight"], sd["mlp.2.bias"])
    cond = F.conv_transpose2d(torch.cat(cond[2::3], 1), sd["cond_proj.weight"], sd["cond_proj.bias"], s, s // 2)
    levels = len(hp["unet_dim_mults"].split("|"))
    h = []
    for i in range(levels):
        x = resnet(f"downs.{i}.1", resnet(f"downs.{i}.0", x, t), t)
        if i == 0:
            x = x + cond
            if hp["up_input"]:
                x = x + conv("up_proj.1", img_lr_up, pad=1)
        h.append(x)
        if i < levels - 1:
            x = conv(f"downs.{i}.2.conv.1", x, pad=1, stride=2)
    x = resnet("mid_block1", x, t)
    if hp["use_attn"]:  # Residual(Rezero(LinearAttention(mid, heads=4, dim_head=32)))
        b, _, hh, ww = x.shape
        qkv = F.conv2d(x, _w(sd, "mid_attn.fn.fn.to_qkv"))
        # 'b (qkv heads c) h w -> qkv b heads c (h w)'
        q, k, v = qkv.reshape(b, 3, 4, 32, hh * ww).permute(1, 0, 2, 3, 4)
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, 128, hh, ww)
        x = conv("mid_attn.fn.fn.to_out", out) * sd["mid_attn.fn.g"] + x
    x = resnet("mid_block2", x, t)
    for i in range(levels - 1):
        x = torch.cat((x, h.pop()), dim=1)
        x = resnet(f"ups.{i}.1", resnet(f"ups.{i}.0", x, t), t)
        x = F.conv_transpose2d(x, sd[f"ups.{i}.2.conv.0.weight"], sd[f"ups.{i}.2.conv.0.bias"], stride=2, padding=1)
    x = block("final_conv.0", x)
    return F.conv2d(x, _w(sd, "final_conv.1"), sd["final_conv.1.bias"])


def ref_sample(sd, hp, img_lr, img_lr_up, generator):
    """``GaussianDiffusion.sample`` (``res``, ``use_rrdb``, ``clip_input``, ``res_rescale=2``), its noise drawn from
    ``generator``: x_T first, then one draw per step with t > 0 (the draws at t = 0 are multiplied by 0)."""
    unet = {k[len("denoise_fn.") :]: v for k, v in sd.items() if k.startswith("denoise_fn.")}
    rrdb = {k[len("rrdb.") :]: v for k, v in sd.items() if k.startswith("rrdb.")}
    buf = {k: v for k, v in sd.items() if "." not in k}
    _, cond = ref_rrdb(rrdb, img_lr, hp["sr_scale"])
    img = torch.randn(img_lr_up.shape, generator=generator)
    for i in reversed(range(hp["timesteps"])):
        t = torch.full((img.shape[0],), i, dtype=torch.long)
        noise_pred = ref_unet(unet, hp, img, t, cond, img_lr_up)
        x_recon = buf["sqrt_recip_alphas_cumprod"][i] * img - buf["sqrt_recipm1_alphas_cumprod"][i] * noise_pred
        x_recon = x_recon.clamp(-1.0, 1.0)
        mean = buf["posterior_mean_coef1"][i] * x_recon + buf["posterior_mean_coef2"][i] * img
        if i > 0:
            noise = torch.randn(img.shape, generator=generator)
            img = mean + (0.5 * buf["posterior_log_variance_clipped"][i]).exp() * noise
        else:
            img = mean
    return img.clamp(-1, 1) / 2.0 + img_lr_up  # res2img


# ----------------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------------


def _save_original(sd, path):
    """As ``utils/utils.py`` ``save_checkpoint``: legacy (non-zip) serialization, the model under state_dict/model."""
    checkpoint = {"global_step": 300000, "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-4}]}]}
    checkpoint["state_dict"] = {"model": sd}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("name", list(HPARAMS))
def test_converted_pipeline_equals_the_original_forward_and_sampler(name, tmp_path):
    hp = HPARAMS[name]
    sd = original_state_dict(hp)
    _save_original(sd, tmp_path / "model_ckpt_steps_300000.ckpt")
    pipe = convert_srdiff_pipeline(tmp_path / "model_ckpt_steps_300000.ckpt")
    pipe.set_progress_bar_config(disable=True)

    # the inferred hyper-parameters
    config = infer_srdiff_config(tmp_path / "model_ckpt_steps_300000.ckpt")
    mults = [int(m) for m in hp["unet_dim_mults"].split("|")]
    assert config["unet"] == {
        "dim": hp["hidden_size"],
        "dim_mults": mults,
        "out_dim": 3,
        "cond_dim": hp["rrdb_num_feat"],
        "rrdb_num_block": hp["rrdb_num_block"],
        "sr_scale": hp["sr_scale"],
        "use_attn": hp["use_attn"],
        "up_input": hp["up_input"],
    }
    assert config["rrdb"] == {
        "num_in_ch": 3,
        "num_out_ch": 3,
        "scale": hp["sr_scale"],
        "num_feat": hp["rrdb_num_feat"],
        "num_block": hp["rrdb_num_block"],
        "num_grow_ch": hp["rrdb_num_feat"] // 2,
    }
    assert pipe.upscale == hp["sr_scale"] and pipe.config.lr_up_gain == 255 / 256 and pipe.config.res_rescale == 2.0

    # denoise_fn: only the prefix is stripped (no renaming), every original tensor is used
    unet_sd = pipe.unet.state_dict()
    original_unet = {k[len("denoise_fn.") :]: v for k, v in sd.items() if k.startswith("denoise_fn.")}
    if not hp["use_wn"]:
        assert set(unet_sd) == set(original_unet)
        assert all(torch.equal(unet_sd[k], v) for k, v in original_unet.items())
    else:
        assert set(unet_sd) == {k.replace("weight_v", "weight") for k in original_unet if not k.endswith("weight_g")}

    # the schedule: the original's betas (cosine: diffusers' squaredcos_cap_v2 itself; linear: trained_betas)
    torch.testing.assert_close(pipe.scheduler.betas, sd["betas"], rtol=0, atol=1e-7)
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, sd["alphas_cumprod"], rtol=0, atol=1e-6)
    expected = "squaredcos_cap_v2" if hp["beta_schedule"] == "cosine" else "linear"  # linear: trained_betas given
    assert pipe.scheduler.config.beta_schedule == expected and pipe.scheduler.config.clip_sample

    # one forward of the encoder and the UNet
    g = torch.Generator().manual_seed(1)
    lr01 = (torch.rand(2, 3, 4, 6, generator=g) * 255).round() / 255
    img_lr = lr01 * 2 - 1
    rrdb = {k[len("rrdb.") :]: v for k, v in sd.items() if k.startswith("rrdb.")}
    ref_out, ref_feas = ref_rrdb(rrdb, img_lr, hp["sr_scale"])
    with torch.no_grad():
        feas = srdiff_encode(pipe.rrdb, img_lr)
        out = pipe.rrdb(lr01).sample
    assert len(feas) == len(ref_feas) == hp["rrdb_num_block"] + 1
    for a, b in zip(feas, ref_feas):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.clamp(0, 1) * 2 - 1, ref_out, rtol=1e-5, atol=1e-5)
    s = hp["sr_scale"]
    x_t = torch.randn(2, 3, 4 * s, 6 * s, generator=g)
    up = torch.randn(2, 3, 4 * s, 6 * s, generator=g) * 0.5
    t = torch.tensor([0, hp["timesteps"] - 1])
    with torch.no_grad():
        eps = pipe.unet(x_t, t, feas, up).sample
    torch.testing.assert_close(eps, ref_unet(original_unet, hp, x_t, t, ref_feas, up), rtol=1e-4, atol=1e-5)

    # the whole sampler, T DDPM steps, with the original's img_lr_up = imresize(img_lr / 256, s)
    img_lr_up = imresize(lr01 * 255 / 256, scale=s) * 2 - 1
    ref = (ref_sample(sd, hp, img_lr, img_lr_up, torch.Generator().manual_seed(5)) + 1) / 2
    with torch.no_grad():
        sr = pipe(
            lr01, num_inference_steps=hp["timesteps"], generator=torch.Generator().manual_seed(5), output_type="pt"
        ).images
    torch.testing.assert_close(sr, ref.clamp(0, 1), rtol=0, atol=2e-4)

    # and it saves and loads as any pipeline
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = AutoSRPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded, SRDiffPipeline) and loaded.config.lr_up_gain == 255 / 256
    assert loaded.scheduler.config.num_train_timesteps == hp["timesteps"]
    torch.testing.assert_close(loaded.scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod, rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", ["flat_model_prefix", "bare", "module_prefix"])
def test_checkpoint_forms(wrapper, tmp_path):
    hp = HPARAMS["x4"]
    sd = original_state_dict(hp)
    if wrapper == "flat_model_prefix":  # {'state_dict': {'model.denoise_fn.…': …}} (a Lightning-style file)
        obj = {"state_dict": {f"model.{k}": v for k, v in sd.items()}}
    elif wrapper == "bare":  # GaussianDiffusion.state_dict(), no schedule buffers
        obj = {k: v for k, v in sd.items() if "." in k}
    else:
        obj = {f"module.{k}": v for k, v in sd.items()}
    torch.save(obj, tmp_path / "srdiff.pth")
    pipe = convert_srdiff_pipeline(tmp_path / "srdiff.pth")
    reference = convert_srdiff_pipeline(sd)
    for name in ("unet", "rrdb"):
        a, b = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pipe.scheduler.config.num_train_timesteps == 100  # bare: the documented default, cosine T=100


def test_denoiser_without_encoder_weights_takes_a_given_rrdb():
    from sr_diffusion.models import RRDBNet

    sd = {k: v for k, v in original_state_dict(HPARAMS["x4"]).items() if not k.startswith("rrdb.")}
    with pytest.raises(CheckpointError, match="no rrdb.* weights"):
        convert_srdiff_pipeline(sd)
    rrdb = RRDBNet(num_feat=8, num_block=5, num_grow_ch=4)
    pipe = convert_srdiff_pipeline(sd, rrdb=rrdb)
    assert pipe.rrdb is rrdb and pipe.unet.config.cond_dim == 8 and pipe.unet.config.rrdb_num_block == 5
    with pytest.raises(CheckpointError, match="has its own rrdb"):
        convert_srdiff_pipeline(original_state_dict(HPARAMS["x4"]), rrdb=rrdb)


def test_conversion_errors(tmp_path):
    sd = original_state_dict(HPARAMS["x4"])
    with pytest.raises(CheckpointError, match="not an SRDiff checkpoint"):
        convert_srdiff_pipeline({"conv_first.weight": torch.zeros(8, 3, 3, 3)})
    with pytest.raises(CheckpointError, match="neither denoise_fn"):
        convert_srdiff_pipeline({**sd, "ssim_window": torch.zeros(1)})
    missing = {k: v for k, v in sd.items() if k != "denoise_fn.downs.0.1.block2.block.1.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys 'downs.0.1.block2.block.1.weight'"):
        convert_srdiff_pipeline(missing)
    extra = {**sd, "denoise_fn.downs.0.1.extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unexpected keys 'downs.0.1.extra.weight'"):
        convert_srdiff_pipeline(extra)
    bad = {**sd, "denoise_fn.mid_block2.mlp.1.weight": torch.zeros(48, 7)}
    with pytest.raises(CheckpointError, match="shape mismatches"):
        convert_srdiff_pipeline(bad)
    bad = {**sd, "denoise_fn.cond_proj.weight": torch.zeros(24, 16, 8, 8)}
    with pytest.raises(CheckpointError, match="cond_proj takes 24 channels"):
        convert_srdiff_pipeline(bad)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        convert_srdiff_pipeline(tmp_path / "empty.ckpt")


def test_cli_convert_detects_srdiff(tmp_path, capsys):
    from sr_diffusion.cli import main

    _save_original(original_state_dict(HPARAMS["x4"]), tmp_path / "model_ckpt_steps_400000.ckpt")
    for args, out in (([], "auto"), (["--arch", "srdiff"], "explicit")):
        assert main(["convert", str(tmp_path / "model_ckpt_steps_400000.ckpt"), str(tmp_path / out), *args]) == 0
        assert "wrote SRDiffPipeline x4" in capsys.readouterr().out
        pipe = AutoSRPipeline.from_pretrained(tmp_path / out)
        assert isinstance(pipe, SRDiffPipeline) and pipe.config.lr_up_gain == 255 / 256
    assert main(["convert", str(tmp_path / "model_ckpt_steps_400000.ckpt"), str(tmp_path / "x"), "--scale", "8"]) == 2
    assert "x4" in capsys.readouterr().err
