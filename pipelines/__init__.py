"""The methods: one folder per pipeline, diffusers conventions. Installed as ``sr_diffusion.pipelines``."""

from .auto_pipeline import PIPELINE_CLASSES, AutoSRPipeline
from .pipeline_output import SRPipelineOutput
from .regression import RegressionSRPipeline
from .resshift import ResShiftPipeline

__all__ = ["AutoSRPipeline", "PIPELINE_CLASSES", "RegressionSRPipeline", "ResShiftPipeline", "SRPipelineOutput"]
