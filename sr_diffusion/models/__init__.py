"""SR architectures as diffusers ``ModelMixin`` models.

Regression (single forward pass) models: EDSR, RRDBNet, SwinIR, SRVGGNetCompact. Every one maps
``(N, 3, h, w)`` RGB in [0, 1] to ``(N, 3, h·upscale, w·upscale)`` in [0, 1]
(not clamped), returns a :class:`RegressionModelOutput` (or a tuple with ``return_dict=False``), and
exposes ``upscale``, ``input_multiple`` and ``flops(height, width)``. Released checkpoints of the
original authors are converted by :func:`sr_diffusion.checkpoints.load_regression_model`.

Diffusion denoisers that need their own architecture for released weights: :class:`ResShiftUNet`
(ResShift's Swin-UNet; converted by :mod:`sr_diffusion.conversion.resshift`), :class:`SR3UNet` (the SR3
re-implementation's UNet; converted by :mod:`sr_diffusion.conversion.sr3`), :class:`SRDiffUNet` (SRDiff's
conditional noise predictor, conditioned on :class:`RRDBNet`'s hidden features; converted by
:mod:`sr_diffusion.conversion.srdiff`). :class:`PixelUnshuffleUNet` (a diffusers ``UNet2DModel`` run on the
space-to-depth rearrangement of the chain, so a pixel-space ResShift costs what a latent one does; the embedded
generative default).

StableSR's add-ons to a frozen Stable Diffusion base: :class:`StableSRTimeAwareEncoder`, :class:`StableSRSFT` (the
UNet's SFT layers, attached by hooks) and :class:`StableSRCFW` (the VAE decoder's CFW layers); converted by
:mod:`sr_diffusion.conversion.stablesr`.

Extra cross-attention layers beside an unforked diffusers UNet's / ControlNet's blocks, under the released names:
:class:`BlockAttentions` (PASD's pixel-aware ``pixel_attentions``, SeeSR's ``image_attentions``).

Low-rank adapters for a frozen UNet's linear layers, held outside it (attached by hooks, or fused for export):
:class:`UNetLoRA` (the LoRA option of the add-on methods' training).

PASD's ControlNet with its degradation-removal module (multi-scale RGB outputs, optional RRDBs):
:class:`PASDControlNetModel`, a subclass of diffusers' ``ControlNetModel``.
"""

from .block_attention import BlockAttentions
from .edsr import EDSR
from .outputs import RegressionModelOutput
from .pasd_controlnet import PASDControlNetModel, PASDControlNetOutput
from .resshift_unet import ResShiftUNet, ResShiftUNetOutput
from .rrdbnet import RRDBNet, RRDBNetOutput
from .sr3_unet import SR3UNet, SR3UNetOutput
from .srdiff_unet import SRDiffUNet, SRDiffUNetOutput
from .srvgg import SRVGGNetCompact
from .stablesr_cfw import StableSRCFW
from .stablesr_encoder import StableSRTimeAwareEncoder, StableSRTimeAwareEncoderOutput
from .stablesr_sft import StableSRSFT
from .swinir import SwinIR
from .unet_lora import UNetLoRA
from .unshuffle_unet import PixelUnshuffleUNet

__all__ = [
    "BlockAttentions",
    "EDSR",
    "PASDControlNetModel",
    "PASDControlNetOutput",
    "PixelUnshuffleUNet",
    "REGRESSION_MODELS",
    "RRDBNet",
    "RRDBNetOutput",
    "RegressionModelOutput",
    "ResShiftUNet",
    "ResShiftUNetOutput",
    "SR3UNet",
    "SR3UNetOutput",
    "SRDiffUNet",
    "SRDiffUNetOutput",
    "SRVGGNetCompact",
    "StableSRCFW",
    "StableSRSFT",
    "StableSRTimeAwareEncoder",
    "StableSRTimeAwareEncoderOutput",
    "SwinIR",
    "UNetLoRA",
]

REGRESSION_MODELS = {"edsr": EDSR, "rrdbnet": RRDBNet, "swinir": SwinIR, "srvgg": SRVGGNetCompact}
