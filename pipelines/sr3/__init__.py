from .pipeline_sr3 import SR3Pipeline

__all__ = ["SR3Pipeline"]
