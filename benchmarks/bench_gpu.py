"""Every pipeline's speed and peak memory on one GPU, at released sizes with random weights (issue 16, item 4).

Each case builds one x4 pipeline with the released architecture's sizes and random weights (speed does not depend on
them), in ``--dtype`` (default float16) on ``--device`` (default cuda), and measures:

- **wall ms / image**: the median of ``--repeats`` calls (default 5) after a warm-up call, ``torch.cuda.synchronize``
  around each;
- **network ms**: the time inside the networks of that same (median) call: every call of a component module
  (denoiser, ControlNet, time-aware encoder, text encoder, RRDB encoder, autoencoder ``encode``/``decode`` and the
  modules under it), timed with CUDA events (``time.perf_counter`` on CPU); nested calls count once;
- **overhead** = wall − network, everything the pipeline adds (checks, scheduler steps, pre/post-processing, tiling
  and blending), as a percentage of the network time (the target: under 3 %);
- **peak GiB**: ``torch.cuda.max_memory_allocated`` of the case (weights included), reset per case; None on CPU.

Cases (128 → 512 by default, ``--lr-size``): ResShift 4 and 15 steps (the released Swin-UNet ``ResShiftUNet`` on the
VQ-f4 autoencoder), StableSR 200 and 50 (SD 2.1-base UNet/VAE/OpenCLIP-H text encoder with the released time-aware
encoder, SFT and CFW), PASD 20 (SD 1.5 + its ControlNet and pixel-aware attention, guidance 9), SeeSR 50 (SD 2.1-base +
ControlNet + image cross-attention on 16 soft prompts of 512, guidance 5.5), LDM-SR 100 (CompVis' openimages UNet on
VQ-f4), SR3 100 (the released 64→512 SR3 UNet), SRDiff 100 (the released x4 UNet on its 8-block RRDB), and the shipped
defaults (``sr_diffusion/weights``: the generative ResShift, 3 steps, and the regression EDSR, their real weights).
Then the same at 512 → 2048 with each pipeline's default tiling: ResShift, StableSR, PASD and SeeSR tile on their own
as their originals do (``AUTO_TILING``: latent canvas tiles and their VAE tiling), the others get ``tile_size=128,
tile_overlap=16`` LR pixels (``--tiny``: every pipeline the tiny tiles, StableSR's VAE ``vae_tile_size=512``, PASD/SeeSR
``vae.enable_tiling()``),
one step count per method, ``--tiled-repeats`` calls after a 2-step warm-up. Variants on ``--variant-cases`` (default
ResShift-4 and StableSR-50): xformers attention instead of SDPA (when ``xformers`` imports; skipped with a note
otherwise) and ``torch.compile`` of the denoiser's forward (compile time, taken by the warm-up, printed, not timed).

A global ``--budget-s`` (default 450) skips the cases that would not start, or would not finish by the estimate of
their 128 → 512 run, in time, with a printed note. ``--tiny`` swaps every architecture for the tests' tiny ones (16 →
64; 32 → 128 tiled, in tiles of 16) so that the script runs on a CPU in seconds.

    .venv/bin/python benchmarks/bench_gpu.py [--only ResShift-4 StableSR ...] [--repeats 5] [--skip-tiled]
        [--json bench_gpu.json] [--budget-s 450] [--device cuda] [--dtype float16] [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

from sr_diffusion.conversion.vq_f4 import RELEASED_VQ_F4_CONFIG

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"  # the offline CLIP tokenizer and the tiny components of the tests

# ----------------------------------------------------------------------------------------------------------------------
# released-size configs, written out (no downloads)
# ----------------------------------------------------------------------------------------------------------------------

#: ``stabilityai/stable-diffusion-2-1-base`` ``unet/config.json`` (the base of StableSR and SeeSR).
SD21_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    norm_num_groups=32,
)
#: ``runwayml/stable-diffusion-v1-5`` ``unet/config.json`` (the base of PASD).
SD15_UNET = {**SD21_UNET, "cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False}
#: The SD VAE (``vae/config.json``, both versions): f = 8, 4 latent channels.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
)
#: The text encoders: SD 2's OpenCLIP ViT-H/14 text tower (23 of 24 layers) and SD 1.5's CLIP ViT-L/14 one.
SD21_TEXT = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
#: ``CompVis/ldm-super-resolution-4x-openimages`` ``unet/config.json``: LR concatenated to the VQ-f4 latent.
LDM_SR_UNET = dict(
    in_channels=6,
    out_channels=3,
    block_out_channels=(160, 320, 320, 640),
    layers_per_block=2,
    down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
    up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",),
    attention_head_dim=32,
)
#: The LDM / ResShift VQ-f4 autoencoder.
VQ_F4 = RELEASED_VQ_F4_CONFIG

TILE = {"tile_size": 128, "tile_overlap": 16}  # LR pixels: latent tiles of 64 for the SD pipelines
TINY_TILE = {"tile_size": 16, "tile_overlap": 4}


# ----------------------------------------------------------------------------------------------------------------------
# pipelines
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One pipeline and call: ``build(tiny) -> (pipeline, kwargs)``, built on the CPU; ``tiled``: also at 512 → 2048."""

    name: str
    build: Callable[[bool], tuple[object, dict]]
    steps: int | None
    tiled: bool = True
    sd: bool = False
    extra: dict = field(default_factory=dict)


def _tests_path() -> None:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def _sd_base(version: str) -> dict:
    """An SD-sized ``vae, text_encoder, tokenizer, unet`` (``version`` "2.1" or "1.5"), random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _tests_path()
    from stablesr_tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    text = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **(SD21_TEXT if version == "2.1" else SD15_TEXT),
    )  # fmt: skip
    unet = UNet2DConditionModel(**(SD21_UNET if version == "2.1" else SD15_UNET))
    return {"vae": AutoencoderKL(**SD_VAE), "text_encoder": CLIPTextModel(text), "tokenizer": tokenizer, "unet": unet}


def build_resshift(tiny: bool):
    from diffusers import VQModel

    from sr_diffusion.models import ResShiftUNet
    from sr_diffusion.pipelines import ResShiftPipeline
    from sr_diffusion.schedulers import RESSHIFT_PRESETS, ResShiftScheduler

    scheduler = ResShiftScheduler(**RESSHIFT_PRESETS["realsr_swinunet_realesrgan256"])
    if tiny:
        _tests_path()
        from test_conversion_resshift import TINY

        unet = ResShiftUNet(**{k: v for k, v in TINY.items()})
        vae = VQModel(**{**VQ_F4, "block_out_channels": (32, 32, 32), "layers_per_block": 1, "num_vq_embeddings": 64})
    else:  # ResShiftUNet's defaults are the released realsr_swinunet_realesrgan256 config
        unet, vae = ResShiftUNet(), VQModel(**VQ_F4)
    return ResShiftPipeline(unet=unet, scheduler=scheduler, vae=vae), {}


def build_stablesr(tiny: bool):
    from sr_diffusion.models import StableSRCFW, StableSRSFT, StableSRTimeAwareEncoder
    from sr_diffusion.pipelines import StableSRPipeline
    from sr_diffusion.pipelines.stablesr import stablesr_scheduler

    if tiny:
        _tests_path()
        from stablesr_tiny import tiny_components

        return StableSRPipeline(**tiny_components()), {}
    parts = _sd_base("2.1")  # the released models' defaults are StableSR's sizes
    modules = {"time_aware_encoder": StableSRTimeAwareEncoder(), "sft": StableSRSFT(), "cfw": StableSRCFW()}
    return StableSRPipeline(**parts, scheduler=stablesr_scheduler(), **modules), {}


def build_pasd(tiny: bool):
    from sr_diffusion.models import BlockAttentions, PASDControlNetModel
    from sr_diffusion.pipelines import PASDPipeline
    from sr_diffusion.pipelines.pasd import pasd_scheduler

    if tiny:
        _tests_path()
        from pasd_tiny import tiny_components

        return PASDPipeline(**tiny_components()), {"guidance_scale": 9.0}
    parts = _sd_base("1.5")
    controlnet = PASDControlNetModel.from_unet(parts["unet"])
    pixel = BlockAttentions.pasd_pixel_attentions(parts["unet"])
    pipe = PASDPipeline(**parts, scheduler=pasd_scheduler(), controlnet=controlnet, pixel_attentions=pixel)
    return pipe, {"guidance_scale": 9.0}


def build_seesr(tiny: bool):
    from sr_diffusion.models.seesr import SEESR_IMAGE_CONTEXT_DIM, seesr_controlnet_from_unet, seesr_image_attentions
    from sr_diffusion.pipelines import SeeSRPipeline
    from sr_diffusion.pipelines.seesr import seesr_scheduler

    if tiny:
        _tests_path()
        from seesr_tiny import soft_prompts, tiny_components

        return SeeSRPipeline(**tiny_components()), {"guidance_scale": 5.5, "image_prompt_embeds": soft_prompts()}
    parts = _sd_base("2.1")
    unet_extra = seesr_image_attentions(parts["unet"], SEESR_IMAGE_CONTEXT_DIM)
    controlnet, controlnet_extra = seesr_controlnet_from_unet(parts["unet"], unet_extra)
    pipe = SeeSRPipeline(
        **parts, scheduler=seesr_scheduler(), controlnet=controlnet, unet_image_attentions=unet_extra,
        controlnet_image_attentions=controlnet_extra,
    )  # fmt: skip
    soft = torch.randn(1, 16, SEESR_IMAGE_CONTEXT_DIM, generator=torch.Generator().manual_seed(0))  # fmt: skip
    return pipe, {"guidance_scale": 5.5, "image_prompt_embeds": soft}


def build_ldm_sr(tiny: bool):
    from diffusers import DDIMScheduler, UNet2DModel, VQModel

    from sr_diffusion.pipelines import LDMSRPipeline

    if tiny:
        unet = UNet2DModel(**{**LDM_SR_UNET, "block_out_channels": (32, 32, 32, 64), "layers_per_block": 1,
                              "attention_head_dim": 8, "norm_num_groups": 8})  # fmt: skip
        vae = VQModel(**{**VQ_F4, "block_out_channels": (32, 32, 32), "layers_per_block": 1, "num_vq_embeddings": 64})
    else:
        unet, vae = UNet2DModel(**LDM_SR_UNET), VQModel(**VQ_F4)
    return LDMSRPipeline(vqvae=vae, unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)), {}


def build_sr3(tiny: bool):
    from diffusers import DDIMScheduler

    from sr_diffusion.conversion.sr3 import RELEASED_CONFIGS, RELEASED_SCHEDULE
    from sr_diffusion.models import SR3UNet
    from sr_diffusion.pipelines import SR3Pipeline

    config = dict(RELEASED_CONFIGS["sr_sr3_64_512"])
    if tiny:
        config |= {"inner_channel": 16, "norm_groups": 8, "channel_mults": [1, 2], "image_size": 64}
    return SR3Pipeline(unet=SR3UNet(**config), scheduler=DDIMScheduler(**RELEASED_SCHEDULE)), {}


def build_srdiff(tiny: bool):
    from diffusers import DDIMScheduler

    from sr_diffusion.models import RRDBNet, SRDiffUNet
    from sr_diffusion.pipelines import SRDiffPipeline
    from sr_diffusion.pipelines.srdiff.pipeline_srdiff import srdiff_scheduler

    # the released x4 (DIV2K) model: hidden_size 64, dim_mults 1|2|3|4, an RRDB encoder of 32 features x 8 blocks
    dim, mults, blocks = (16, (1, 2), 2) if tiny else (64, (1, 2, 3, 4), 8)
    unet = SRDiffUNet(dim=dim, dim_mults=mults, cond_dim=32, rrdb_num_block=blocks, sr_scale=4)
    rrdb = RRDBNet(num_feat=32, num_block=blocks, num_grow_ch=16, scale=4)
    scheduler = DDIMScheduler.from_config(srdiff_scheduler().config)
    return SRDiffPipeline(unet=unet, rrdb=rrdb, scheduler=scheduler), {}


def build_default(kind: str, tiny: bool):
    """The shipped pipeline (its real weights: the embedded models are small enough for ``--tiny`` too)."""
    from sr_diffusion.defaults import default_pipeline_dir
    from sr_diffusion.pipelines import AutoSRPipeline

    return AutoSRPipeline.from_pretrained(default_pipeline_dir(kind)), {}


CASES = [
    Case("ResShift-4", build_resshift, 4),
    Case("ResShift-15", build_resshift, 15, tiled=False),
    Case("StableSR-200", build_stablesr, 200, tiled=False, sd=True),
    Case("StableSR-50", build_stablesr, 50, sd=True, extra={"vae_tile_size": 512, "vae_tile_overlap": 64}),
    Case("PASD-20", build_pasd, 20, sd=True),
    Case("SeeSR-50", build_seesr, 50, sd=True),
    Case("LDM-SR-100", build_ldm_sr, 100),
    Case("SR3-100", build_sr3, 100),
    Case("SRDiff-100", build_srdiff, 100),
    Case("default-ResShift-3", functools.partial(build_default, "generative"), None),
    Case("default-EDSR", functools.partial(build_default, "regression"), None),
]


# ----------------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------------


class NetworkTimer:
    """Time inside the component modules: forward hooks on every component and its direct children, plus
    ``encode``/``decode`` of the autoencoders. Only the outermost call counts, so nested modules are not counted twice.
    CUDA events on a GPU (no synchronisation inside the pipeline), ``time.perf_counter`` on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.depth = 0
        self.spans: list = []

    def _enter(self) -> None:
        self.depth += 1
        if self.depth == 1:
            self._start = self._now()

    def _exit(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.spans.append((self._start, self._now()))

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def attached(self, pipe):
        """Hooks on ``pipe``'s component modules while inside; removed (and ``encode``/``decode`` restored) after."""
        handles, wrapped = [], []
        for module in pipe.components.values():
            if not isinstance(module, torch.nn.Module):
                continue
            for sub in (module, *module.children()):
                handles.append(sub.register_forward_pre_hook(lambda *_: self._enter()))
                handles.append(sub.register_forward_hook(lambda *_: self._exit()))
            for method in ("encode", "decode"):
                if callable(getattr(module, method, None)):
                    setattr(module, method, self._wrap(getattr(module, method)))
                    wrapped.append((module, method))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for module, method in wrapped:
                delattr(module, method)  # the instance attribute: the class's method again

    def _wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit()

        return timed

    def reset(self) -> None:
        self.depth, self.spans = 0, []

    def seconds(self) -> float:
        """Total seconds of the spans since :meth:`reset` (call after ``torch.cuda.synchronize``)."""
        if self.cuda:
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1000
        return sum(end - start for start, end in self.spans)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_note(backend: str) -> str | None:
    """None when ``backend`` can run here, else why not."""
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except Exception as error:  # ImportError, or a broken build
            return f"xformers not importable ({type(error).__name__})"
    return None


_BUILT: dict = {}  # builder -> (pipeline, call kwargs), kept in CPU memory: every case of a method shares one build


def built(case: Case, tiny: bool):
    """The case's pipeline, built on the CPU once per builder (random init of an SD-sized model takes seconds)."""
    key = (case.build, tiny)
    if key not in _BUILT:
        torch.manual_seed(0)
        _BUILT[key] = case.build(tiny)
    return _BUILT[key]


@contextlib.contextmanager
def configured(pipe, device, dtype, attention: str, compiled: bool, vae_tiling: bool):
    """The pipeline on ``device``/``dtype`` with the case's attention backend, compiled denoiser and VAE tiling;
    every change undone and the pipeline back on the CPU afterwards."""
    attn = {n: m.attn_processors for n, m in pipe.components.items() if hasattr(m, "set_attn_processor")}
    forward = pipe.unet.forward if compiled else None
    pipe.to(device, dtype)
    try:
        if attention == "xformers":
            pipe.enable_xformers_memory_efficient_attention()
        if compiled:
            pipe.unet.forward = torch.compile(forward)
        if vae_tiling:
            pipe.vae.enable_tiling()
        yield pipe
    finally:
        if attention == "xformers":
            pipe.disable_xformers_memory_efficient_attention()
        for name, processors in attn.items():
            getattr(pipe, name).set_attn_processor(processors)
        if compiled:
            pipe.unet.forward = forward
        if vae_tiling:
            pipe.vae.disable_tiling()
        pipe.to("cpu")
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()


def run_case(case: Case, args, device: torch.device, dtype: torch.dtype, tiled: bool, attention: str, compiled: bool):
    """Warm up and time one case; returns its result row."""
    pipe, kwargs = built(case, args.tiny)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v.to(device, dtype) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    lr = args.tiled_lr_size if tiled else args.lr_size
    # 512 -> 2048 with our defaults: the pipelines that tile on their own as their originals (AUTO_TILING: ResShift,
    # StableSR, PASD, SeeSR, VAE included) get no tiling keywords; the others TILE (and, tiny, everything TINY_TILE)
    own_tiling = tiled and getattr(pipe, "AUTO_TILING", False) and not args.tiny
    if tiled and not own_tiling:
        kwargs |= dict(TINY_TILE if args.tiny else TILE) | case.extra
    steps = (args.steps or case.steps) if case.steps is not None else None  # no steps: the regression default
    image = torch.rand(1, 3, lr, lr, generator=torch.Generator().manual_seed(0)).to(device)
    vae_tiling = tiled and case.sd and "vae_tile_size" not in case.extra and not own_tiling
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = NetworkTimer(device)
    with configured(pipe, device, dtype, attention, compiled, vae_tiling), timer.attached(pipe):

        def call(num_steps):
            step_kwargs = {} if num_steps is None else {"num_inference_steps": num_steps}
            if "generator" in inspect.signature(pipe.__call__).parameters:  # not the regression pipeline
                step_kwargs["generator"] = torch.Generator().manual_seed(0)  # a CPU generator, as users pass
            with torch.inference_mode():
                return pipe(image, output_type="pt", **step_kwargs, **kwargs).images

        # warm-up: kernels, cuDNN choices and the compiled graph; the tiled cases warm up with 2 steps
        sync(device)
        start = time.perf_counter()
        call(min(2, steps) if tiled and steps else steps)
        sync(device)
        compile_s = time.perf_counter() - start if compiled else None
        runs = []
        for _ in range(args.tiled_repeats if tiled else args.repeats):
            timer.reset()
            sync(device)
            start = time.perf_counter()
            images = call(steps)
            sync(device)
            runs.append((time.perf_counter() - start, timer.seconds()))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    runs.sort()
    wall, network = runs[len(runs) // 2]  # the median run (the upper one of an even count)
    return {
        "name": case.name,
        "size": f"{lr}->{images.shape[-1]}",
        "tiled": tiled,
        "attention": attention,
        "compile": compiled,
        "steps": steps,
        "repeats": len(runs),
        "wall_ms": statistics.median(r[0] for r in runs) * 1000,
        "network_ms": network * 1000,
        "overhead_ms": (wall - network) * 1000,
        "overhead_fraction": (wall - network) / wall,  # of the wall time
        "overhead_pct_of_network": 100 * (wall - network) / network if network > 0 else None,
        "peak_gib": peak,
        "compile_s": compile_s,
    }


# ----------------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------------


def select(names: list[str] | None) -> list[Case]:
    """The cases named (case-insensitive; a name without its step count, e.g. ``StableSR``, takes every variant)."""
    if not names:
        return list(CASES)
    wanted = [n.lower() for n in names]
    chosen = [c for c in CASES if any(c.name.lower() == w or c.name.lower().startswith(w + "-") for w in wanted)]
    unknown = [n for n in names if not any(c.name.lower() == n.lower() or c.name.lower().startswith(n.lower() + "-")
                                           for c in CASES)]  # fmt: skip
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(c.name for c in CASES)}")
    return chosen


def plan(args) -> list[tuple[Case, bool, str, bool]]:
    """``(case, tiled, attention, compiled)`` in the order run: 128 → 512 first, then its variants, then tiled."""
    cases = select(args.only)
    variants = {n.lower() for n in args.variant_cases}
    jobs = [(c, False, "sdpa", False) for c in cases]
    for c in cases:
        if c.name.lower() in variants:
            if "xformers" in args.attention:
                jobs.append((c, False, "xformers", False))
            if args.compile in ("on", "both"):
                jobs.append((c, False, "sdpa", True))
    if args.compile == "on":  # only compiled rows
        jobs = [j for j in jobs if j[3] or j[0].name.lower() not in variants]
    if not args.skip_tiled:
        jobs += [(c, True, "sdpa", False) for c in cases if c.tiled]
    return jobs


def label(row: dict) -> str:
    extras = [x for x in (row["attention"] if row["attention"] != "sdpa" else "", "compiled" if row["compile"] else "")
              if x]  # fmt: skip
    return row["name"] + (f" ({', '.join(extras)})" if extras else "")


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| case | size | steps | wall ms | network ms | overhead | peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {label(r)} | {r['size']} | | skipped: {r['skipped']} | | | |")
            continue
        overhead = f"{fmt(r['overhead_pct_of_network'], '.1f')} % ({r['overhead_ms']:.1f} ms)"
        lines.append(
            f"| {label(r)} | {r['size']} | {r['steps'] if r['steps'] is not None else 'default'} | {r['wall_ms']:.1f} "
            f"| {r['network_ms']:.1f} | {overhead} | {fmt(r['peak_gib'], '.2f')} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="cases to run (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per 128->512 case (the median is kept)")
    parser.add_argument("--tiled-repeats", type=int, default=1, help="timed calls per tiled 512->2048 case")
    parser.add_argument("--skip-tiled", action="store_true", help="no 512->2048 cases")
    parser.add_argument("--tiny", action="store_true", help="tiny architectures, 16->64: a CPU run in seconds")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the rows here")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip the cases that would overrun this")
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["sdpa", "xformers"],
        choices=["sdpa", "xformers"],
        help="backends compared on --variant-cases (xformers skipped when not importable)",
    )
    parser.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="both",
        help="torch.compile of the denoiser on --variant-cases",
    )
    parser.add_argument("--variant-cases", nargs="*", default=["ResShift-4", "StableSR-50"], metavar="NAME")
    parser.add_argument("--lr-size", type=int, default=None, help="LR side (default 128; 16 with --tiny)")
    parser.add_argument("--tiled-lr-size", type=int, default=None, help="tiled LR side (default 512; 32 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="override every case's steps (smoke tests only)")
    args = parser.parse_args(argv)
    args.lr_size = args.lr_size or (16 if args.tiny else 128)
    args.tiled_lr_size = args.tiled_lr_size or (32 if args.tiny else 512)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # not the float32-modules warning of every pipe.to(dtype)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # the warm-up call picks the convolution algorithms
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    header = (f"## {name}: x4, {args.dtype}, torch {torch.__version__}, median of {args.repeats} "
              f"({args.tiled_repeats} tiled){', tiny architectures' if args.tiny else ''}")  # fmt: skip
    print(header, flush=True)
    begin, rows = time.perf_counter(), []
    done: dict[str, float] = {}  # name -> wall s at 128->512, for the tiled estimates
    for case, tiled, attention, compiled in plan(args):
        lr = args.tiled_lr_size if tiled else args.lr_size
        row = {
            "name": case.name,
            "size": f"{lr}->{4 * lr}",
            "attention": attention,
            "compile": compiled,
            "tiled": tiled,
        }
        elapsed = time.perf_counter() - begin
        # a tiled case costs ~25 times the 128->512 call (25 tiles), for the timed calls and a quarter for the warm-up
        estimate = done.get(case.name, 0.0) * 25 * (args.tiled_repeats + 0.25) if tiled else 0.0
        note = attention_note(attention)
        if note is None and elapsed + estimate > args.budget_s:
            note = f"budget ({elapsed:.0f} s spent, ~{estimate:.0f} s estimated, budget {args.budget_s:.0f} s)"
        if note is not None:
            print(f"skipped {label(row)} {row['size']}: {note}", flush=True)
            rows.append(row | {"skipped": note})
            continue
        try:
            result = run_case(case, args, device, dtype, tiled, attention, compiled)
        except Exception as error:  # one broken case must not lose the rest of the run
            note = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
            print(f"failed {label(row)} {row['size']}: {note}", flush=True)
            rows.append(row | {"skipped": note})
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            continue
        if not tiled and attention == "sdpa" and not compiled:
            done[case.name] = result["wall_ms"] / 1000
        rows.append(result)
        compile_note = f", compile {result['compile_s']:.1f} s (excluded)" if compiled else ""
        print(f"{label(result)} {result['size']}: {result['wall_ms']:.1f} ms{compile_note}", flush=True)
    print(f"\ntotal {time.perf_counter() - begin:.0f} s\n")
    print(table(rows, header))
    if args.json:
        payload = {"device": name, "dtype": args.dtype, "torch": torch.__version__, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=1))
    return rows


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
