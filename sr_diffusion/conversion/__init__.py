"""Converters from the checkpoints that method authors released to our models.

* :func:`convert_resshift_unet`: ResShift's ``resshift_*.pth`` denoisers →
  :class:`~sr_diffusion.models.resshift_unet.ResShiftUNet`.
* :func:`convert_vq_f4`: the LDM / ResShift VQ autoencoder (``autoencoder_vq_f4.pth``) → ``diffusers.VQModel``.

Files are read safely (safetensors, or ``torch.load(weights_only=True)``), hyper-parameters are inferred
from key names and shapes, and loading is strict: anything that does not fit raises a
:class:`~sr_diffusion.checkpoints.CheckpointError` naming the keys.
"""

from .resshift import convert_resshift_unet, infer_resshift_unet_config
from .vq_f4 import convert_vq_f4, infer_vq_f4_config, ldm_vq_to_diffusers

__all__ = [
    "convert_resshift_unet",
    "convert_vq_f4",
    "infer_resshift_unet_config",
    "infer_vq_f4_config",
    "ldm_vq_to_diffusers",
]
