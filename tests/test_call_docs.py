"""Every pipeline's ``__call__`` documents each of its arguments, the shared ones from pipelines/call_docs.py."""

from __future__ import annotations

import inspect
import re

import pytest

from sr_diffusion.pipelines import (
    LDMSRPipeline,
    PASDPipeline,
    RegressionSRPipeline,
    ResShiftPipeline,
    SeeSRPipeline,
    SR3Pipeline,
    SRDiffPipeline,
    StableSRPipeline,
)
from sr_diffusion.pipelines.call_docs import SHARED_CALL_ARGS, shared_call_docs

PIPELINES = [
    LDMSRPipeline,
    PASDPipeline,
    RegressionSRPipeline,
    ResShiftPipeline,
    SeeSRPipeline,
    SR3Pipeline,
    SRDiffPipeline,
    StableSRPipeline,
]


def documented_args(doc: str) -> dict[str, str]:
    """``Args:`` entries of a Google-style docstring: name -> its paragraph (continuation lines joined)."""
    body = doc.split("Args:", 1)[1].split("Returns:", 1)[0]
    lines = body.splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    entries: dict[str, str] = {}
    name = None
    for line in lines:
        match = re.match(rf"^ {{{indent}}}(\w+)(?: \(.*?\))?: (.*)$", line)
        if match:
            name = match[1]
            entries[name] = match[2]
        elif name and line.strip():
            entries[name] += " " + line.strip()
    return entries


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda c: c.__name__)
def test_call_documents_every_argument_with_the_shared_paragraphs(pipeline):
    doc = inspect.getdoc(pipeline.__call__)
    assert not re.search(r": \{\w+\}", doc), "an unfilled shared-paragraph placeholder"
    entries = documented_args(doc)
    params = [p for p in inspect.signature(pipeline.__call__).parameters if p != "self"]
    assert set(params) == set(entries), (set(params) - set(entries), set(entries) - set(params))
    used = [key for key, text in SHARED_CALL_ARGS.items() if key in entries and entries[key].startswith(text)]
    assert {"output_type", "return_dict"} <= set(used)
    for line in doc.splitlines():
        assert len(line) <= 120 - 8, line  # wrapped as the source (8 columns of method indentation)


def test_shared_call_docs_fills_placeholders_and_refuses_unknown_ones():
    def call():
        """Upscale.

        Args:
            output_type: {output_type}
            eta: {eta} Ignored by this one.
            other: not shared.
        """

    doc = shared_call_docs(call).__doc__
    assert "output_type: " + SHARED_CALL_ARGS["output_type"] in doc and "other: not shared." in doc
    assert documented_args(inspect.cleandoc(doc))["eta"] == SHARED_CALL_ARGS["eta"] + " Ignored by this one."

    def bad():
        """Args:
        x: {nothing}
        """

    with pytest.raises(KeyError, match="no shared argument paragraph 'nothing'"):
        shared_call_docs(bad)


def test_training_validation_defaults_are_the_pipelines_call_defaults():
    """The SD training sections take their validation settings from the pipelines (one place for each default)."""
    from sr_diffusion.pipelines.sd_base import call_default
    from sr_diffusion.training.pasd import PASDConfig
    from sr_diffusion.training.seesr import SeeSRConfig
    from sr_diffusion.training.stablesr import StableSRConfig

    assert call_default(PASDPipeline, "added_noise_level") == 900  # None in the signature: FIDELITY_DEFAULTS
    assert call_default(StableSRPipeline, "fidelity_weight") == 0.5
    with pytest.raises(ValueError, match="no default for 'image'"):
        call_default(PASDPipeline, "image")
    for section, pipeline in (
        (PASDConfig(), PASDPipeline),
        (SeeSRConfig(), SeeSRPipeline),
        (StableSRConfig(), StableSRPipeline),
    ):
        for keyword in (
            "num_inference_steps",
            "guidance_scale",
            "added_noise_level",
            "start_point",
            "color_fix",
            "fidelity_weight",
        ):
            if hasattr(section, keyword):
                default = call_default(pipeline, keyword)
                assert getattr(section, keyword) == default, (type(section).__name__, keyword)
    assert (PASDConfig().guidance_scale, SeeSRConfig().num_inference_steps, StableSRConfig().num_inference_steps) == (
        9.0,
        50,
        200,
    )  # the originals'
