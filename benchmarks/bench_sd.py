"""Per-step time and peak memory of the SR pipelines on a Stable Diffusion base (StableSR, PASD, SeeSR), and the tiled
path to a 2048x2048 output under a memory bound, on this machine's CPU (or a GPU with --device cuda).

Every pipeline runs on the same small SD-shaped base with random weights (speed does not depend on them): a
``UNet2DConditionModel`` with SD's block layout at widths (64, 128, 256, 256), 2 layers per block, 256-d text
cross-attention; an SD-shaped ``AutoencoderKL`` (f = 8) at widths (32, 64, 128, 128), one layer per block; a 2-layer
CLIP text encoder. Each method adds its own modules at the base's widths (StableSR: time-aware encoder + SFT + CFW;
PASD: ControlNet with the degradation-removal module + pixel-aware attention; SeeSR: ControlNet + image
cross-attention in both, soft prompts of 16 tokens) and runs with its own default guidance (StableSR none, PASD 9.0,
SeeSR 5.5: both halves of classifier-free guidance are evaluated).

1. **Per step**: a 128x128 → 512x512 upscale (64x64 latent) with 2 and with 6 steps; one step = (t6 - t2) / 4, so
   the VAE and the text encoder drop out. Peak RSS of a fresh process running that call (``ru_maxrss``).
2. **Tiled 2048x2048**: a 512x512 → 2048x2048 upscale (256x256 latent) in latent tiles of 64 (``tile_size=128`` LR
   pixels, ``tile_overlap=16``), 2 steps, with a tiled VAE encode/decode: PASD and SeeSR use the VAE's own tiling
   (``vae.enable_tiling()``); StableSR its own ``vae_tile_size=512, vae_tile_overlap=64`` (output pixels; the original's
   ``vqgantile_size`` idea at a smaller tile than its 1280), which keeps CFW on at its default ``fidelity_weight``
   (0.5): every decoder tile is fused with the encoder features of its own image region. Peak RSS of a fresh process
   against ``--max-rss-gb``.

    .venv/bin/python benchmarks/bench_sd.py [--only step|tiled] [--methods stablesr pasd seesr] [--max-rss-gb 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the offline CLIP tokenizer of the tests

METHODS = ("stablesr", "pasd", "seesr")
UNET_WIDTHS = (64, 128, 256, 256)
VAE_WIDTHS = (32, 64, 128, 128)
TEXT_DIM = 256


def base() -> dict:
    """The small SD-shaped base: vae, text_encoder, tokenizer, unet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from stablesr_tiny import tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=UNET_WIDTHS,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=VAE_WIDTHS,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
    ).eval()
    tokenizer = tiny_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77,
    )  # fmt: skip
    return {"vae": vae, "text_encoder": CLIPTextModel(text).eval(), "tokenizer": tokenizer, "unet": unet}


def build(method: str):
    """``(pipeline, call kwargs)`` of one method on :func:`base`."""
    parts = base()
    unet = parts["unet"]
    torch.manual_seed(1)
    if method == "stablesr":
        from sr_diffusion.models import StableSRCFW, StableSRSFT, StableSRTimeAwareEncoder
        from sr_diffusion.pipelines import StableSRPipeline
        from sr_diffusion.pipelines.stablesr import stablesr_scheduler

        encoder = StableSRTimeAwareEncoder(
            in_channels=4, model_channels=64, out_channels=128, num_res_blocks=1, channel_mult=(1, 2, 4, 4),
            attention_resolutions=(4, 2, 1), num_heads=4,
        )  # fmt: skip
        sft = StableSRSFT(block_out_channels=UNET_WIDTHS, layers_per_block=2, cond_channels=128, hidden_channels=64)
        cfw = StableSRCFW(block_out_channels=VAE_WIDTHS, num_fuse_block=2, num_grow_ch=32)
        pipe = StableSRPipeline(**parts, scheduler=stablesr_scheduler(), time_aware_encoder=encoder, sft=sft, cfw=cfw)
        return pipe, {}
    if method == "pasd":
        from sr_diffusion.models import BlockAttentions, PASDControlNetModel
        from sr_diffusion.pipelines import PASDPipeline
        from sr_diffusion.pipelines.pasd import pasd_scheduler

        controlnet = PASDControlNetModel.from_unet(unet)
        pixel = BlockAttentions.pasd_pixel_attentions(unet)
        pipe = PASDPipeline(**parts, scheduler=pasd_scheduler(), controlnet=controlnet, pixel_attentions=pixel)
        return pipe, {"guidance_scale": 9.0}
    if method == "seesr":
        from sr_diffusion.models.seesr import seesr_controlnet_from_unet, seesr_image_attentions
        from sr_diffusion.pipelines import SeeSRPipeline
        from sr_diffusion.pipelines.seesr import seesr_scheduler

        unet_extra = seesr_image_attentions(unet, 512)
        controlnet, controlnet_extra = seesr_controlnet_from_unet(unet, unet_extra)
        pipe = SeeSRPipeline(
            **parts, scheduler=seesr_scheduler(), controlnet=controlnet, unet_image_attentions=unet_extra,
            controlnet_image_attentions=controlnet_extra,
        )  # fmt: skip
        soft = torch.randn(1, 16, 512, generator=torch.Generator().manual_seed(0))
        return pipe, {"guidance_scale": 5.5, "image_prompt_embeds": soft}
    raise ValueError(method)


def run_case(method: str, case: str, device: str) -> dict:
    """One measurement in this process; returns seconds and this process's peak RSS."""
    pipe, kwargs = build(method)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)

    def call(size: int, steps: int, **extra):
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = pipe(image, num_inference_steps=steps, generator=generator, output_type="pt", **kwargs, **extra)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, out.images

    result: dict = {"method": method, "case": case}
    if case == "step":
        call(128, 2)  # warm-up
        t2, _ = call(128, 2)
        t6, images = call(128, 6)
        result |= {"per_step_s": (t6 - t2) / 4, "call_2_steps_s": t2, "output": list(images.shape[-2:])}
    else:
        extra = {"tile_size": 128, "tile_overlap": 16}
        if method == "stablesr":  # its own VAE tiling, with CFW at the default fidelity_weight
            extra |= {"vae_tile_size": 512, "vae_tile_overlap": 64}
        else:
            pipe.vae.enable_tiling()
        seconds, images = call(512, 2, **extra)
        result |= {"seconds_2_steps": seconds, "output": list(images.shape[-2:])}
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    if device.startswith("cuda"):
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def in_fresh_process(method: str, case: str, args) -> dict:
    command = [sys.executable, __file__, "--child", method, case, "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["step", "tiled"], default=None)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--max-rss-gb", type=float, default=4.0, help="the tiled 2048x2048 path's memory bound")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_case(*args.child, args.device)))
        return

    print(f"device={args.device}, torch threads={args.threads or torch.get_num_threads()}")
    if args.only in (None, "step"):
        print("\n# 1. 128x128 -> 512x512 (latent 64x64), each method's default guidance")
        print(f"{'method':10s} {'s / step':>9s} {'2-step call s':>14s} {'peak RSS GiB':>13s}")
        for method in args.methods:
            r = in_fresh_process(method, "step", args)
            row = f"{method:10s} {r['per_step_s']:9.3f} {r['call_2_steps_s']:14.2f} {r['peak_rss_gib']:13.2f}"
            print(row, flush=True)
    if args.only in (None, "tiled"):
        print(
            f"\n# 2. 512x512 -> 2048x2048 (latent 256x256), latent tiles 64 / overlap 8, tiled VAE, 2 steps; "
            f"bound {args.max_rss_gb} GiB"
        )
        print(f"{'method':10s} {'output':>10s} {'seconds':>8s} {'peak RSS GiB':>13s} {'within bound':>13s}")
        for method in args.methods:
            r = in_fresh_process(method, "tiled", args)
            ok = "yes" if r["peak_rss_gib"] <= args.max_rss_gb else "NO"
            size = "x".join(map(str, r["output"]))
            row = f"{method:10s} {size:>10s} {r['seconds_2_steps']:8.1f} {r['peak_rss_gib']:13.2f} {ok:>13s}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
