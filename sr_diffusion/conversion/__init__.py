"""Converters from the checkpoints that method authors released to our models.

* :func:`convert_resshift_unet`: ResShift's ``resshift_*.pth`` denoisers →
  :class:`~sr_diffusion.models.resshift_unet.ResShiftUNet`.
* :func:`convert_sr3_pipeline` / :func:`convert_sr3_unet`: the SR3 re-implementation's (Janspiry)
  ``I..._E.._gen.pth`` → :class:`~sr_diffusion.pipelines.SR3Pipeline` /
  :class:`~sr_diffusion.models.sr3_unet.SR3UNet`.
* :func:`convert_srdiff_pipeline`: SRDiff's ``model_ckpt_steps_*.ckpt`` (UNet and RRDB encoder) →
  :class:`~sr_diffusion.pipelines.SRDiffPipeline`.
* :func:`convert_vq_f4`: the LDM / ResShift VQ autoencoder (``autoencoder_vq_f4.pth``) → ``diffusers.VQModel``.

* :func:`convert_checkpoint`: any registered method's checkpoint → its pipeline (what ``sr-diffusion convert``
  saves): the method is found by the detectors registered in :mod:`sr_diffusion.registry`
  (:func:`detect_method`), or named, and its registered converter is called.

Files are read safely (safetensors, or ``torch.load(weights_only=True)``), hyper-parameters are inferred
from key names and shapes, and loading is strict: anything that does not fit raises a
:class:`~sr_diffusion.checkpoints.CheckpointError` naming the keys.
"""

from sr_diffusion.registry import convert_checkpoint, detect_method

from .resshift import convert_resshift_unet, infer_resshift_unet_config
from .sr3 import convert_sr3_pipeline, convert_sr3_scheduler, convert_sr3_unet, infer_sr3_unet_config
from .srdiff import convert_srdiff_pipeline, infer_srdiff_config
from .vq_f4 import convert_vq_f4, infer_vq_f4_config, ldm_vq_to_diffusers

__all__ = [
    "convert_checkpoint",
    "detect_method",
    "convert_resshift_unet",
    "convert_sr3_pipeline",
    "convert_sr3_scheduler",
    "convert_sr3_unet",
    "convert_srdiff_pipeline",
    "convert_vq_f4",
    "infer_resshift_unet_config",
    "infer_sr3_unet_config",
    "infer_srdiff_config",
    "infer_vq_f4_config",
    "ldm_vq_to_diffusers",
]
