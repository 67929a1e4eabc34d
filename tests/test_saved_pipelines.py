"""Folders saved by earlier versions still load and run: every diffusion pipeline saved by version 0.1.0 (tiny test
components, weights zeroed; written by ``tests/data/saved_pipelines/make.py``) loads through ``AutoSRPipeline`` and
upscales its test class's dummy input to exactly ``upscale`` × its size."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from sr_diffusion.pipelines import AutoSRPipeline

SAVED = Path(__file__).resolve().parent / "data" / "saved_pipelines"
FOLDERS = sorted(p for p in SAVED.glob("*/*") if (p / "model_index.json").is_file())

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def _tester(class_name: str):
    from data.saved_pipelines.make import CASES  # tests/ is on sys.path

    for module, name in CASES:
        tester = getattr(importlib.import_module(module), name)
        if tester.pipeline_class.__name__ == class_name:
            return tester()
    raise LookupError(class_name)


def test_every_diffusion_pipeline_has_a_saved_folder_of_version_0_1_0():
    names = {p.name for p in FOLDERS if p.parent.name == "0.1.0"}
    assert names == {"SR3Pipeline", "SRDiffPipeline", "LDMSRPipeline", "ResShiftPipeline", "StableSRPipeline",
                     "PASDPipeline", "SeeSRPipeline"}  # fmt: skip


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_folder_saved_by_an_earlier_version_loads_and_runs(folder):
    class_name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    pipe = AutoSRPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert type(pipe).__name__ == class_name == folder.name
    pipe.set_progress_bar_config(disable=True)
    inputs = {**_tester(class_name).get_dummy_inputs(0), "output_type": "pt"}
    image = inputs["image"]
    out = pipe(**inputs).images
    assert out.shape[-2:] == (image.shape[-2] * pipe.upscale, image.shape[-1] * pipe.upscale)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
