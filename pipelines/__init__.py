"""The methods: one folder per pipeline, diffusers conventions. Installed as ``sr_diffusion.pipelines``."""

from .auto_pipeline import PIPELINE_CLASSES, AutoSRPipeline
from .ldm_sr import LDMSRPipeline
from .pasd import PASDPipeline
from .pipeline_output import SRPipelineOutput
from .regression import RegressionSRPipeline
from .resshift import ResShiftPipeline
from .seesr import SeeSRPipeline
from .sr3 import SR3Pipeline
from .srdiff import SRDiffPipeline
from .stablesr import StableSRPipeline

__all__ = [
    "AutoSRPipeline",
    "LDMSRPipeline",
    "PASDPipeline",
    "PIPELINE_CLASSES",
    "RegressionSRPipeline",
    "ResShiftPipeline",
    "SeeSRPipeline",
    "SR3Pipeline",
    "SRDiffPipeline",
    "SRPipelineOutput",
    "StableSRPipeline",
]
