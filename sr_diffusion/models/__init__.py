"""SR architectures as diffusers ``ModelMixin`` models.

Regression (single forward pass) models: EDSR, RRDBNet, SwinIR, SRVGGNetCompact. Every one maps
``(N, 3, h, w)`` RGB in [0, 1] to ``(N, 3, h·upscale, w·upscale)`` in [0, 1]
(not clamped), returns a :class:`RegressionModelOutput` (or a tuple with ``return_dict=False``), and
exposes ``upscale``, ``input_multiple`` and ``flops(height, width)``. Released checkpoints of the
original authors are converted by :func:`sr_diffusion.checkpoints.load_regression_model`.

Diffusion denoisers that need their own architecture for released weights: :class:`ResShiftUNet`
(ResShift's Swin-UNet; converted by :mod:`sr_diffusion.conversion.resshift`).
"""

from .edsr import EDSR
from .outputs import RegressionModelOutput
from .resshift_unet import ResShiftUNet, ResShiftUNetOutput
from .rrdbnet import RRDBNet
from .srvgg import SRVGGNetCompact
from .swinir import SwinIR

__all__ = [
    "EDSR",
    "REGRESSION_MODELS",
    "RRDBNet",
    "RegressionModelOutput",
    "ResShiftUNet",
    "ResShiftUNetOutput",
    "SRVGGNetCompact",
    "SwinIR",
]

REGRESSION_MODELS = {"edsr": EDSR, "rrdbnet": RRDBNet, "swinir": SwinIR, "srvgg": SRVGGNetCompact}
