from .pipeline_regression import RegressionSRPipeline

__all__ = ["RegressionSRPipeline"]
