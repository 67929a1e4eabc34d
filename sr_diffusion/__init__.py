"""sr_diffusion: diffusion and regression image super-resolution, the diffusers way.

Importing the package is cheap: it loads no model, pipeline, training or optional dependency.
Import what you need from its modules, e.g. ``from sr_diffusion.pipelines import RegressionSRPipeline``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
