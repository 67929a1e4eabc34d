from .pipeline_ldm_sr import LDMSRPipeline

__all__ = ["LDMSRPipeline"]
