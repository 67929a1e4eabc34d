from .pipeline_srdiff import SRDiffPipeline

__all__ = ["SRDiffPipeline"]
