from .pipeline_resshift import ResShiftPipeline

__all__ = ["ResShiftPipeline"]
