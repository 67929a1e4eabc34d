"""``SRPipelineTesterMixin``: the checks every sr_diffusion pipeline passes (diffusers'
``tests/pipelines/test_pipelines_common.py`` style).

A pipeline's test class inherits it and provides::

    class TestMyPipeline(SRPipelineTesterMixin):
        pipeline_class = MyPipeline

        def get_dummy_components(self) -> dict:     # tiny seeded components, the pipeline's __init__ kwargs
            ...

        def get_dummy_inputs(self, seed: int = 0) -> dict:
            # __call__ kwargs: "image" an LR tensor (1, 3, h, w) in [0, 1] drawn from `seed` (different seeds, different
            # images), plus "generator" = torch.Generator().manual_seed(seed) when the pipeline takes one, and anything
            # else the call needs to be fast (e.g. num_inference_steps). output_type is set by the tests.
            ...

Batches are seeded diffusers' way: a list of generators, one per image, so that image ``i`` of a batch is what the
pipeline gives for that image alone with ``generator[i]``. Pipelines without ``generator`` / ``latents`` /
``callback_on_step_end`` arguments skip the tests that need them.

Class attributes to tune: ``odd_sizes`` (LR sizes that must come back at exactly ``upscale`` × the size),
``batch_atol`` (batched convolutions may round differently), ``save_load_atol`` (weights loaded from safetensors
may sit at addresses that make the CPU's BLAS pick other kernels: equal to float rounding, diffusers' 1e-4 by
default) and ``stochastic`` (a different seed gives a different
output).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from sr_diffusion.metrics import lr_consistency
from sr_diffusion.pipelines import AutoSRPipeline, SRPipelineOutput

__all__ = ["OffloadTracker", "SRPipelineTesterMixin"]

REPO = Path(__file__).resolve().parents[1]


def _public(config) -> dict:
    """A pipeline config without diffusers' bookkeeping (``_class_name``, ``_name_or_path``, ...)."""
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


class OffloadTracker:
    """Follows accelerate's model-offload hooks on a CPU-only machine, where "on the device" and "offloaded" are the
    same memory: it records, per hooked model, whether its hook has moved it to the execution device (``pre_forward``)
    or back (``init_hook``, which ``offload()`` and ``maybe_free_model_hooks`` call), and every parameterised
    submodule that runs while its model is offloaded — on a GPU, a device-mismatch error (an entry point such as
    ``encode`` / ``decode`` that bypasses the model's ``forward`` without diffusers' ``apply_forward_hook``)."""

    def __init__(self, monkeypatch):
        from accelerate.hooks import CpuOffload

        self.on_device: dict[int, bool] = {}
        self.loaded: set[str] = set()
        self.violations: list[str] = []
        self.names: dict[int, str] = {}
        pre_forward, init_hook = CpuOffload.pre_forward, CpuOffload.init_hook
        tracker = self

        def tracked_pre_forward(hook, module, *args, **kwargs):
            result = pre_forward(hook, module, *args, **kwargs)
            tracker.on_device[id(module)] = True
            tracker.loaded.add(tracker.names.get(id(module), "?"))
            return result

        def tracked_init_hook(hook, module):
            result = init_hook(hook, module)
            tracker.on_device[id(module)] = False
            return result

        monkeypatch.setattr(CpuOffload, "pre_forward", tracked_pre_forward)
        monkeypatch.setattr(CpuOffload, "init_hook", tracked_init_hook)

    def watch(self, pipe) -> list[str]:
        """Watch every hooked component of ``pipe`` (after ``enable_model_cpu_offload``); returns their names."""
        hooked = []
        for name, component in pipe.components.items():
            if not isinstance(component, torch.nn.Module) or id(component) not in self.on_device:
                continue
            hooked.append(name)
            self.names[id(component)] = name
            for sub_name, sub in component.named_modules():
                if next(sub.parameters(recurse=False), None) is None:
                    continue

                sub.register_forward_pre_hook(self._checker(component, f"{name}.{sub_name}".rstrip(".")))
        return hooked

    def _checker(self, owner: torch.nn.Module, where: str):
        def check(module, args):
            if not self.on_device[id(owner)]:
                self.violations.append(where)

        return check


class SRPipelineTesterMixin:
    pipeline_class: type = None
    odd_sizes: tuple[tuple[int, int], ...] = ((1, 1), (5, 7), (9, 4))
    batch_atol: float = 1e-4
    save_load_atol: float = 1e-4
    stochastic: bool = True

    # ------------------------------------------------------------------------------------------ to provide

    def get_dummy_components(self) -> dict:
        raise NotImplementedError

    def get_dummy_inputs(self, seed: int = 0) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ helpers

    def get_pipeline(self, components: dict | None = None):
        pipe = self.pipeline_class(**(components or self.get_dummy_components()))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _accepts(self, name: str) -> bool:
        return name in inspect.signature(self.pipeline_class.__call__).parameters

    def _run(self, pipe, seed: int = 0, **overrides) -> torch.Tensor:
        inputs = {**self.get_dummy_inputs(seed), "output_type": "pt", **overrides}
        return pipe(**inputs).images

    # ------------------------------------------------------------------------------------------ save / load

    def test_save_load_round_trip(self, tmp_path):
        pipe = self.get_pipeline()
        ref = self._run(pipe)
        pipe.save_pretrained(tmp_path)

        loaded = self.pipeline_class.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert _public(loaded.config) == _public(pipe.config)
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                loaded_state = getattr(loaded, name).state_dict()
                assert all(torch.equal(v, loaded_state[k]) for k, v in component.state_dict().items()), name
        torch.testing.assert_close(self._run(loaded), ref, rtol=0, atol=self.save_load_atol)

        auto = AutoSRPipeline.from_pretrained(tmp_path)
        assert type(auto) is self.pipeline_class
        assert _public(auto.config) == _public(pipe.config)
        auto.set_progress_bar_config(disable=True)
        torch.testing.assert_close(self._run(auto), ref, rtol=0, atol=self.save_load_atol)

    @pytest.mark.slow  # a new interpreter imports torch and diffusers: seconds
    def test_save_load_in_a_fresh_process(self, tmp_path):
        """A new interpreter, which has imported nothing of ours, loads the folder with ``AutoSRPipeline`` alone."""
        pipe = self.get_pipeline()
        inputs = {**self.get_dummy_inputs(0), "output_type": "pt"}
        ref = pipe(**inputs).images
        pipe.save_pretrained(tmp_path / "pipe")
        seed = 0 if "generator" in inputs else None
        call_kwargs = {k: v for k, v in inputs.items() if k not in ("image", "generator")}
        torch.save({"image": inputs["image"], "kwargs": call_kwargs, "seed": seed}, tmp_path / "inputs.pt")
        script = textwrap.dedent(
            f"""
            import torch
            from sr_diffusion.pipelines import AutoSRPipeline
            pipe = AutoSRPipeline.from_pretrained({str(tmp_path / "pipe")!r})
            pipe.set_progress_bar_config(disable=True)
            inputs = torch.load({str(tmp_path / "inputs.pt")!r})
            kwargs = dict(inputs["kwargs"])
            if inputs["seed"] is not None:
                kwargs["generator"] = torch.Generator().manual_seed(inputs["seed"])
            torch.save(pipe(inputs["image"], **kwargs).images, {str(tmp_path / "out.pt")!r})
            """
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ref, rtol=0, atol=self.save_load_atol)

    # ------------------------------------------------------------------------------------------ batching, outputs

    def test_batch_matches_single(self):
        pipe = self.get_pipeline()
        first, second = self.get_dummy_inputs(0), self.get_dummy_inputs(1)
        batch_inputs = {**first, "image": torch.cat([first["image"], second["image"]]), "output_type": "pt"}
        if self._accepts("generator"):
            batch_inputs["generator"] = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
        batch = pipe(**batch_inputs).images
        assert batch.shape[0] == 2
        for i, single_inputs in enumerate((first, second)):
            single = pipe(**{**single_inputs, "output_type": "pt"}).images
            torch.testing.assert_close(batch[i : i + 1], single, rtol=0, atol=self.batch_atol)

    def test_dict_equals_tuple(self):
        pipe = self.get_pipeline()
        out = pipe(**{**self.get_dummy_inputs(0), "output_type": "pt"})
        assert isinstance(out, SRPipelineOutput)
        tup = pipe(**{**self.get_dummy_inputs(0), "output_type": "pt", "return_dict": False})
        assert isinstance(tup, tuple) and len(tup) == 1
        torch.testing.assert_close(out.images, tup[0], rtol=0, atol=0)

    def test_determinism_with_a_generator(self):
        if not self._accepts("generator"):
            pytest.skip("the pipeline takes no generator")
        pipe = self.get_pipeline()
        a = self._run(pipe, seed=0)
        b = self._run(pipe, seed=0)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        if self.stochastic:
            inputs = self.get_dummy_inputs(0)
            other = self._run(pipe, seed=0, generator=torch.Generator().manual_seed(1234))
            assert inputs["image"].shape[0] == 1
            assert (other - a).abs().max() > 1e-4, "a different seed gave the same output"

    def test_odd_sizes_come_back_at_exactly_scale_times(self):
        pipe = self.get_pipeline()
        scale = pipe.upscale
        for h, w in self.odd_sizes:
            image = self.get_dummy_inputs(0)["image"]
            image = torch.nn.functional.interpolate(image, size=(h, w), mode="bilinear", antialias=h < image.shape[-2])
            out = self._run(pipe, image=image.clamp(0, 1))
            assert out.shape == (1, 3, h * scale, w * scale), (h, w)
            assert torch.isfinite(out).all()

    def test_output_types(self):
        pipe = self.get_pipeline()
        inputs = self.get_dummy_inputs(0)
        _, _, h, w = inputs["image"].shape
        scale = pipe.upscale
        pt = pipe(**{**inputs, "output_type": "pt"}).images
        assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, h * scale, w * scale)
        assert pt.min() >= 0 and pt.max() <= 1
        arr = pipe(**{**self.get_dummy_inputs(0), "output_type": "np"}).images
        assert isinstance(arr, np.ndarray) and arr.shape == (1, h * scale, w * scale, 3)
        np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
        pil = pipe(**{**self.get_dummy_inputs(0), "output_type": "pil"}).images
        assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (w * scale, h * scale)
        with pytest.raises(ValueError, match="output_type"):
            pipe(**{**self.get_dummy_inputs(0), "output_type": "latent"})

    def test_alpha_channel_is_carried_through(self):
        pipe = self.get_pipeline()
        image = self.get_dummy_inputs(0)["image"]
        rgba = torch.cat([image, torch.linspace(0, 1, image.shape[-1]).expand_as(image[:, :1])], dim=1)
        out = self._run(pipe, image=rgba)
        rgb = self._run(pipe, image=image)
        assert out.shape[1] == 4
        torch.testing.assert_close(out[:, :3], rgb, rtol=0, atol=1e-6)  # alpha does not change the colours

    # ------------------------------------------------------------------------------------------ LR consistency

    def test_lr_consistency_makes_the_output_explain_its_input(self):
        """``lr_consistency=True``: the output, MATLAB-bicubic downsampled by the scale, gives back the input (LR-PSNR
        >= 40 dB, where the tiny random models alone are far from it), deterministically, also when tiled; the alpha
        channel is unaffected."""
        if not self._accepts("lr_consistency"):
            pytest.skip("the pipeline takes no lr_consistency")
        pipe = self.get_pipeline()
        scale = pipe.upscale
        lr = self.get_dummy_inputs(0)["image"]
        plain = self._run(pipe)
        consistent = self._run(pipe, lr_consistency=True)
        assert consistent.shape == plain.shape and consistent.min() >= 0 and consistent.max() <= 1
        psnr_with, psnr_without = lr_consistency(lr, consistent, scale), lr_consistency(lr, plain, scale)
        assert (psnr_with >= 40).all(), psnr_with
        assert (psnr_without < psnr_with).all(), (psnr_without, psnr_with)
        torch.testing.assert_close(self._run(pipe, lr_consistency=True), consistent, rtol=0, atol=0)

        rgba = torch.cat([lr, torch.linspace(0, 1, lr.shape[-1]).expand_as(lr[:, :1])], dim=1)
        with_alpha, alpha_only = self._run(pipe, image=rgba, lr_consistency=True), self._run(pipe, image=rgba)
        torch.testing.assert_close(with_alpha[:, :3], consistent, rtol=0, atol=1e-6)
        torch.testing.assert_close(with_alpha[:, 3:], alpha_only[:, 3:], rtol=0, atol=0)

        m = pipe.lr_multiple
        tile = m * -(-4 // m)  # 4 LR pixels or the next multiple the pipeline takes: several tiles on the 8x8 input
        if self._accepts("tile_size") and tile < min(lr.shape[-2:]):
            tiled = self._run(pipe, lr_consistency=True, tile_size=tile, tile_overlap=tile // 2)
            assert (lr_consistency(lr, tiled, scale) >= 40).all()

        with pytest.raises(ValueError, match="lr_consistency must be a bool"):
            self._run(pipe, lr_consistency="yes")

    # ------------------------------------------------------------------------------------------ offload

    def test_model_cpu_offload_runs_every_model_on_the_device_and_changes_nothing(self, monkeypatch):
        """``enable_model_cpu_offload`` (here with ``device="cpu"``: the hooks run as on a GPU machine): the same
        image, every hooked model moved to the device before any of its layers runs, and all offloaded afterwards."""
        pipe = self.get_pipeline()
        reference = self._run(pipe)
        tracker = OffloadTracker(monkeypatch)
        pipe.enable_model_cpu_offload(device="cpu")
        hooked = tracker.watch(pipe)
        sequence = [n for n in pipe.model_cpu_offload_seq.split("->") if getattr(pipe, n, None) is not None]
        assert set(sequence) <= set(hooked), (sequence, hooked)
        assert str(pipe._execution_device) == "cpu:0"

        torch.testing.assert_close(self._run(pipe), reference, rtol=0, atol=0)
        assert not tracker.violations, f"layers ran while their model was offloaded: {sorted(set(tracker.violations))}"
        assert tracker.loaded, "no model was moved to the device"
        assert not any(tracker.on_device[id(getattr(pipe, n))] for n in hooked), "models left on the device"

        # the instrument itself: a layer of an offloaded model, called directly, is caught
        name = next(iter(tracker.loaded))
        layer = next(m for m in getattr(pipe, name).modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
        conv = isinstance(layer, torch.nn.Conv2d)
        layer(torch.zeros(1, layer.in_channels, 3, 3) if conv else torch.zeros(1, layer.in_features))
        assert tracker.violations

    # ------------------------------------------------------------------------------------------ callbacks

    def test_callback_on_step_end_runs_once_per_step_and_may_change_latents(self):
        if not self._accepts("callback_on_step_end"):
            pytest.skip("the pipeline takes no callback_on_step_end")
        pipe = self.get_pipeline()
        steps: list[int] = []

        def count(pipeline, i, t, callback_kwargs):
            assert set(callback_kwargs) == {"latents"}
            steps.append(i)
            return callback_kwargs

        ref = self._run(pipe, callback_on_step_end=count)
        assert steps == list(range(pipe.num_timesteps)) and steps, steps

        def zero_last(pipeline, i, t, callback_kwargs):
            latents = callback_kwargs["latents"]
            return {"latents": torch.zeros_like(latents) if i == pipeline.num_timesteps - 1 else latents}

        changed = self._run(pipe, callback_on_step_end=zero_last)
        assert (changed - ref).abs().max() > 1e-3, "the latents the callback returned were not used"
        # a callback that changes nothing changes nothing
        torch.testing.assert_close(self._run(pipe), ref, rtol=0, atol=0)

        with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
            self._run(pipe, callback_on_step_end=count, callback_on_step_end_tensor_inputs=["not_a_tensor"])
