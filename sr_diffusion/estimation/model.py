"""The degradation estimator: a small CNN that reads an LR image and estimates how degraded it is.

It predicts, per image, the three quantities of :class:`DegradationEstimate` (blur, noise level, JPEG quality), each
defined on the LR grid from the parameters of the Real-ESRGAN second-order degradation it is trained on (see
:mod:`sr_diffusion.estimation.targets` for the exact definitions). ``fidelity="auto"`` in the SR pipelines maps the
estimate to their fidelity knobs (:mod:`sr_diffusion.fidelity_auto`).

Architecture (fully convolutional, then global pooling, so any input of at least :attr:`min_input_size` pixels a side
works), for an image ``x`` ``(B, 3, h, w)`` in [0, 1]:

* a CNN branch on ``[2x - 1, 8 (x - box3(x))]`` ``(B, 6, h, w)`` (the image and its amplified high-pass residual,
  ``box3`` a reflect-padded 3x3 mean, so that noise of a few 255ths is not drowned by the content): a stride-1 stem of
  two 3x3 convolutions at the input resolution (noise and JPEG blocks live at the pixel level), then one stage per
  further entry of ``block_out_channels``, each a stride-2 3x3 convolution and a 3x3 convolution, LeakyReLU (0.2)
  after every convolution; the last feature map ``(B, C, h', w')`` is pooled into its spatial mean and standard
  deviation ``(B, 2C)``;
* a JPEG branch: the orthonormal 8x8 block DCT of the luma ``Y = 255 (0.299 R + 0.587 G + 0.114 B)`` on the grid
  anchored at the top-left pixel (JPEG's), summarised per frequency over the blocks by ``log(1 + mean |c|)`` and the
  fraction of ``|c| < 1`` (quantisation zeroes coefficients): ``(B, 128)``;
* a two-layer MLP on both, ``(B, 2C + 128) -> (B, 3)``: the normalised estimate ``z``. The physical values
are ``q = target_mean + target_std · z`` (clamped to each quantity's range); the training loss is the L1 distance in
``z`` (:mod:`sr_diffusion.training.degradation_estimator`), i.e. each quantity's absolute error in units of its
training standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from .targets import BLUR_SIGMA_MIN

__all__ = [
    "QUANTITIES",
    "DegradationEstimate",
    "DegradationEstimator",
    "DegradationEstimatorOutput",
    "load_default_degradation_estimator",
]

#: The estimated quantities, in the order of the model's outputs.
QUANTITIES = ("blur_sigma", "noise_sigma", "jpeg_quality")

#: Valid range of each quantity (estimates are clamped to it).
_RANGES = {"blur_sigma": (BLUR_SIGMA_MIN, None), "noise_sigma": (0.0, None), "jpeg_quality": (1.0, 100.0)}

# Mean and standard deviation of the targets under the default training distribution (Real-ESRGAN x4plus with each
# noise / JPEG stage switched off 20% of the time, 192-pixel HR crops of the bundled training photos); training
# re-measures them (estimator.calibration_samples; these are its values on 512 crops, seed 0).
_DEFAULT_MEAN = (0.73, 8.8, 75.6)
_DEFAULT_STD = (0.26, 6.0, 23.6)
_BLOCK = 8  # JPEG's block size


@dataclass
class DegradationEstimate:
    """How degraded each image of a batch is, on its LR grid (definitions: :mod:`sr_diffusion.estimation.targets`).

    Args:
        blur_sigma (`torch.Tensor` of shape `(B,)`): the equivalent isotropic Gaussian blur, in LR pixels (at least
            ``sqrt(2 ln 2) / pi ~ 0.375``: as sharp as the grid allows).
        noise_sigma (`torch.Tensor` of shape `(B,)`): the noise standard deviation on the 0..255 scale.
        jpeg_quality (`torch.Tensor` of shape `(B,)`): the quality of the last JPEG compression, 100 for none.
    """

    blur_sigma: torch.Tensor
    noise_sigma: torch.Tensor
    jpeg_quality: torch.Tensor

    def __post_init__(self):
        shapes = {name: tuple(torch.as_tensor(getattr(self, name)).shape) for name in QUANTITIES}
        if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
            raise ValueError(f"every quantity of a DegradationEstimate must be a (B,) tensor, got shapes {shapes}")
        for name in QUANTITIES:
            setattr(self, name, torch.as_tensor(getattr(self, name), dtype=torch.float32))

    def __len__(self) -> int:
        return self.blur_sigma.shape[0]

    def __getitem__(self, index) -> DegradationEstimate:
        """The estimate of the images ``index`` selects (an int keeps a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return DegradationEstimate(*(getattr(self, name)[index] for name in QUANTITIES))

    def to_tensor(self) -> torch.Tensor:
        """``(B, 3)``: the quantities in :data:`QUANTITIES` order."""
        return torch.stack([getattr(self, name) for name in QUANTITIES], dim=1)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> DegradationEstimate:
        """From a ``(B, 3)`` tensor in :data:`QUANTITIES` order."""
        if values.ndim != 2 or values.shape[1] != len(QUANTITIES):
            raise ValueError(f"expected a (B, {len(QUANTITIES)}) tensor, got shape {tuple(values.shape)}")
        return cls(*values.unbind(1))

    def mean(self) -> DegradationEstimate:
        """The batch mean, as an estimate of one image."""
        return DegradationEstimate.from_tensor(self.to_tensor().mean(0, keepdim=True))

    def to(self, device) -> DegradationEstimate:
        return DegradationEstimate(*(getattr(self, name).to(device) for name in QUANTITIES))

    def as_dict(self) -> dict[str, list[float]]:
        """``{quantity: [value per image]}`` (plain floats, for logs and JSON)."""
        return {name: [float(v) for v in getattr(self, name)] for name in QUANTITIES}


@dataclass
class DegradationEstimatorOutput(BaseOutput):
    """Output of :class:`DegradationEstimator`.

    Args:
        estimate (`DegradationEstimate`): the physical quantities, ``(B,)`` each, clamped to their ranges.
        normalized (`torch.Tensor` of shape `(B, 3)`): ``z = (q - target_mean) / target_std`` as predicted (not
            clamped), what training compares with the targets.
    """

    estimate: DegradationEstimate
    normalized: torch.Tensor


class DegradationEstimator(ModelMixin, ConfigMixin):
    r"""Estimates blur, noise level and JPEG quality of LR images (module docstring).

    Args:
        block_out_channels: widths of the stem (first entry) and of each stride-2 stage (the others).
        head_channels: hidden width of the MLP head.
        target_mean, target_std: per quantity (:data:`QUANTITIES` order), the affine map between the network's
            normalised outputs and the physical values; training sets them to the training targets' statistics.

    Example::

        estimator = DegradationEstimator.from_pretrained(folder)  # or load_default_degradation_estimator()
        estimate = estimator(lr).estimate  # lr: (B, 3, h, w) in [0, 1], h, w >= estimator.min_input_size
        estimate.noise_sigma  # (B,), 0..255 scale
    """

    @register_to_config
    def __init__(
        self,
        block_out_channels: Sequence[int] = (24, 32, 48, 64),
        head_channels: int = 64,
        target_mean: Sequence[float] = _DEFAULT_MEAN,
        target_std: Sequence[float] = _DEFAULT_STD,
    ):
        super().__init__()
        widths = [int(c) for c in block_out_channels]
        if not widths or min(widths) < 1:
            raise ValueError(f"block_out_channels must be positive widths, got {list(block_out_channels)}")
        if len(target_mean) != len(QUANTITIES) or len(target_std) != len(QUANTITIES):
            raise ValueError(f"target_mean and target_std need one value per quantity {QUANTITIES}")
        if min(target_std) <= 0:
            raise ValueError(f"target_std must be positive, got {list(target_std)}")
        layers: list[nn.Module] = [nn.Conv2d(6, widths[0], 3, padding=1), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(widths[0], widths[0], 3, padding=1), nn.LeakyReLU(0.2)]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            layers += [nn.Conv2d(cout, cout, 3, padding=1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Linear(2 * widths[-1] + 2 * _BLOCK**2, head_channels),
            nn.LeakyReLU(0.2),
            nn.Linear(head_channels, len(QUANTITIES)),
        )
        self.register_buffer("dct_basis", _dct_basis(_BLOCK), persistent=False)
        self.register_buffer("mean", torch.tensor(list(target_mean), dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(list(target_std), dtype=torch.float32), persistent=False)
        # He initialisation: with PyTorch's default one the features' spatial variation, which carries the noise and
        # JPEG evidence, shrinks ~10x per stage and training stalls at the mean
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.head[-1].weight)  # start at the training mean (z = 0)

    @property
    def min_input_size(self) -> int:
        """The smallest input side: two 8x8 DCT blocks, and 2x2 positions for the last stage (16 up to four widths)."""
        return max(2 * _BLOCK, 2 ** len(self.config.block_out_channels))

    # ------------------------------------------------------------------------------------------------------------------
    # normalisation
    # ------------------------------------------------------------------------------------------------------------------

    def normalize(self, estimate: DegradationEstimate) -> torch.Tensor:
        """``(B, 3)`` ``z = (q - target_mean) / target_std`` of an estimate (or of training targets)."""
        values = estimate.to_tensor().to(self.mean.device)
        return (values - self.mean) / self.std

    def denormalize(self, normalized: torch.Tensor) -> DegradationEstimate:
        """The physical estimate of normalised outputs ``(B, 3)``, clamped to each quantity's range."""
        values = normalized.float() * self.std + self.mean
        columns = [values[:, i].clamp(*_RANGES[name]) for i, name in enumerate(QUANTITIES)]
        return DegradationEstimate(*columns)

    def mean_estimate(self, batch_size: int = 1) -> DegradationEstimate:
        """The training targets' mean for ``batch_size`` images: the "predict the mean" baseline."""
        return self.denormalize(torch.zeros(batch_size, len(QUANTITIES), device=self.mean.device))

    # ------------------------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------------------------

    def check_image(self, image: torch.Tensor) -> None:
        """Raise a ``ValueError`` unless ``image`` is a float ``(B, 3, h, w)`` batch with ``h, w >= min_input_size``."""
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"DegradationEstimator expects a (B, 3, h, w) RGB batch in [0, 1], got {shape}")
        if not image.is_floating_point():
            raise ValueError(f"DegradationEstimator expects a float tensor in [0, 1], got dtype {image.dtype}")
        h, w = image.shape[-2:]
        if min(h, w) < self.min_input_size:
            raise ValueError(
                f"the degradation estimator needs images of at least {self.min_input_size}x{self.min_input_size} "
                f"pixels, got {w}x{h}"
            )

    def dct_statistics(self, image: torch.Tensor) -> torch.Tensor:
        """The JPEG branch's ``(B, 128)`` features of ``image`` ``(B, 3, h, w)`` in [0, 1] (module docstring)."""
        luma = 255.0 * (image * image.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        h, w = luma.shape[-2:]
        luma = luma[..., : h - h % _BLOCK, : w - w % _BLOCK]
        coefficients = F.conv2d(luma, self.dct_basis.to(luma.dtype), stride=_BLOCK).flatten(2).abs()  # (B, 64, n)
        return torch.cat([coefficients.mean(-1).log1p(), (coefficients < 1.0).to(luma.dtype).mean(-1)], dim=1)

    def forward(self, image: torch.Tensor, return_dict: bool = True):
        """Estimate the degradation of ``image`` ``(B, 3, h, w)`` in [0, 1] (the LR input of an SR model).

        Returns:
            :class:`DegradationEstimatorOutput` (``estimate``: the physical quantities; ``normalized``: ``(B, 3)``), or
            the tuple ``(estimate, normalized)``.
        """
        self.check_image(image)
        x = image.to(self.dtype)
        highpass = x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
        features = self.features(torch.cat([x * 2.0 - 1.0, 8.0 * highpass], dim=1)).flatten(2)  # (B, C, h'w')
        pooled = torch.cat([features.mean(-1), features.std(-1, unbiased=False), self.dct_statistics(x)], dim=1)
        normalized = self.head(pooled).float()
        estimate = self.denormalize(normalized)
        if not return_dict:
            return estimate, normalized
        return DegradationEstimatorOutput(estimate=estimate, normalized=normalized)


def _dct_basis(n: int) -> torch.Tensor:
    """The ``n x n`` orthonormal DCT-II basis images as ``(n^2, 1, n, n)`` convolution filters."""
    k = torch.arange(n, dtype=torch.float64)
    basis = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))  # (frequency, position)
    basis[0] /= math.sqrt(2.0)
    basis *= math.sqrt(2.0 / n)
    return torch.einsum("ux,vy->uvyx", basis, basis).reshape(n * n, 1, n, n).to(torch.float32)


def load_default_degradation_estimator(device: str | torch.device | None = None) -> DegradationEstimator:
    """The estimator shipped in the package (``sr_diffusion/weights/degradation_estimator``, trained by
    ``configs/degradation_estimator_default.yaml``), in eval mode."""
    from sr_diffusion.defaults import default_degradation_estimator_dir

    model = DegradationEstimator.from_pretrained(default_degradation_estimator_dir()).eval()
    return model if device is None else model.to(device)
