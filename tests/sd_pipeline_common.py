"""``SDPipelineTesterMixin``: what every SR pipeline on a Stable Diffusion base (StableSR, PASD, SeeSR) must support
beyond :class:`~pipeline_common.SRPipelineTesterMixin` — attention backends, the xformers switch, SD LoRAs through
``load_lora_weights``, bf16 and fp16, and a valid offload sequence (diffusers' ``test_pipelines_common.py`` style).

A test class inherits both mixins and provides ``pipeline_class``, ``get_dummy_components`` and
``get_dummy_inputs`` as for :class:`~pipeline_common.SRPipelineTesterMixin`.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from sr_diffusion.prompts import PromptExtraction, PromptExtractor

__all__ = ["FixedExtractor", "SDPipelineTesterMixin", "attention_modules", "record_prompts", "run", "tiny_inputs"]


def tiny_inputs(seed: int = 0) -> dict:
    """The dummy ``__call__`` inputs of the tiny SD pipelines: an 8x8 LR image drawn from ``seed``, 2 steps."""
    from stablesr_tiny import lr_image

    return {"image": lr_image(seed), "num_inference_steps": 2, "generator": torch.Generator().manual_seed(seed)}


def run(pipe, image=None, seed: int = 0, **kwargs) -> torch.Tensor:
    """``pipe(image, ...)`` as a tensor, 2 steps with a generator seeded ``seed`` (``image``: :func:`tiny_inputs`'
    image of seed 0)."""
    inputs = {**tiny_inputs(0), "generator": torch.Generator().manual_seed(seed), "output_type": "pt"}
    if image is not None:
        inputs["image"] = image
    return pipe(**{**inputs, **kwargs}).images


class FixedExtractor(PromptExtractor):
    """Tags per image from a list; records the images it saw."""

    def __init__(self, tags):
        self.tags, self.seen = tags, []

    def __call__(self, images):
        self.seen.append(images)
        return PromptExtraction(hard_prompts=list(self.tags[: images.shape[0]]))


def record_prompts(pipe, monkeypatch) -> list[list[str]]:
    """Every prompt list the pipeline embeds, in order (negative prompts after the prompts)."""
    seen: list[list[str]] = []
    original = pipe.embed_prompts

    def spy(prompts, device):
        seen.append(list(prompts))
        return original(prompts, device)

    monkeypatch.setattr(pipe, "embed_prompts", spy)
    return seen


def attention_modules(pipe) -> dict[str, Attention]:
    """Every diffusers ``Attention`` in the pipeline's components (base and add-ons), by qualified name."""
    found = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for sub, module in component.named_modules():
                if isinstance(module, Attention):
                    found[f"{name}.{sub}"] = module
    return found


class SDPipelineTesterMixin:
    #: the text-to-image attention layers of the base (and add-ons) dominate: classic and SDPA attention agree to this
    attention_atol: float = 1e-4

    def _sd_run(self, pipe, seed: int = 0, **overrides) -> torch.Tensor:
        inputs = {**self.get_dummy_inputs(seed), "output_type": "pt", **overrides}
        return pipe(**inputs).images

    def test_every_attention_runs_on_sdpa_and_classic_attention_agrees(self):
        pipe = self.get_pipeline()
        modules = attention_modules(pipe)
        assert modules, "the pipeline has no diffusers Attention modules"
        assert all(isinstance(m.processor, AttnProcessor2_0) for m in modules.values())
        sdpa = self._sd_run(pipe)
        for module in modules.values():
            module.set_processor(AttnProcessor())
        classic = self._sd_run(pipe)
        torch.testing.assert_close(classic, sdpa, rtol=0, atol=self.attention_atol)

    def test_xformers_switch_reaches_every_attention_including_the_add_ons(self, monkeypatch):
        pipe = self.get_pipeline()
        switched = []

        def record(module, valid, attention_op=None):
            switched.append((module, valid))

        monkeypatch.setattr(Attention, "set_use_memory_efficient_attention_xformers", record)
        pipe.enable_xformers_memory_efficient_attention()
        modules = attention_modules(pipe)
        on = {id(m) for m, valid in switched if valid}
        missed = [name for name, m in modules.items() if id(m) not in on]
        assert not missed, f"enable_xformers_memory_efficient_attention misses {missed[:5]}"

    def test_sd_lora_loads_changes_the_output_and_unloads(self, tmp_path):
        from peft import LoraConfig, get_peft_model_state_dict

        pipe = self.get_pipeline()
        base = self._sd_run(pipe)
        unet = pipe.unet
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        layers = get_peft_model_state_dict(unet)
        unet.delete_adapters("default")
        torch.testing.assert_close(self._sd_run(pipe), base)  # back to the base without the adapter
        type(pipe).save_lora_weights(tmp_path, unet_lora_layers=layers)

        pipe.load_lora_weights(tmp_path)
        with_lora = self._sd_run(pipe)
        assert (with_lora - base).abs().max() > 1e-3, "the LoRA did not reach the UNet"
        pipe.fuse_lora()
        torch.testing.assert_close(self._sd_run(pipe), with_lora, rtol=0, atol=1e-4)
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        torch.testing.assert_close(self._sd_run(pipe), base, rtol=0, atol=1e-5)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_precision_components_give_a_close_finite_image(self, dtype):
        pipe = self.get_pipeline()
        reference = self._sd_run(pipe)
        pipe.to(dtype)
        low = self._sd_run(pipe)
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        assert (low - reference).abs().mean() < 0.05

    def test_offload_sequence_names_registered_components(self):
        pipe = self.get_pipeline()
        names = pipe.model_cpu_offload_seq.split("->")
        components = pipe.components
        assert all(n in components for n in names), names
        excluded = set(getattr(pipe, "_exclude_from_cpu_offload", []))
        modules = {n for n, c in components.items() if isinstance(c, torch.nn.Module)}
        # every model is either offloaded in sequence or explicitly kept on the device
        assert modules - set(names) - excluded == set(), modules - set(names) - excluded
