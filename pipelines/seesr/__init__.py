from .pipeline_seesr import SeeSRPipeline, seesr_scheduler

__all__ = ["SeeSRPipeline", "seesr_scheduler"]
