"""One config per degradation model, with Real-ESRGAN's option names and the x4plus / BSRGAN defaults.

``RealESRGANDegradationConfig`` mirrors the degradation options of Real-ESRGAN's
``options/train_realesrnet_x4plus.yml`` (Wang et al., 2021); ``BSRGANDegradationConfig`` holds the constants
of BSRGAN's ``degradation_bsrgan`` (Zhang et al., 2021). Both are frozen dataclasses validated on
construction: unknown keys, probabilities outside [0, 1], ranges with ``low > high`` and unknown kernel types
raise a ``ValueError`` that names the field. Sequences are stored as tuples and written as lists.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sr_diffusion.utils import is_int

from .kernels import KERNEL_TYPES

__all__ = ["BSRGANDegradationConfig", "RealESRGANDegradationConfig"]

_ALL_KERNELS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
_X4PLUS_KERNEL_PROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)


# ------------------------------------------------------------------------------------------------------------
# Validation helpers: each returns the normalised value or raises ValueError naming the field
# ------------------------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(name: str, value, low: float | None = None, high: float | None = None, open_low=False) -> float:
    if not _is_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (open_low and value == low)):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return float(value)


def _probability(name: str, value) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a probability and must be in [0, 1], got {value!r}")
    return float(value)


def _integer(name: str, value, low: int = 1, odd: bool = False) -> int:
    if not is_int(value) or value < low or (odd and value % 2 != 1):
        raise ValueError(f"{name} must be an {'odd ' if odd else ''}integer >= {low}, got {value!r}")
    return value


def _range(name: str, value, low: float | None = None, high: float | None = None, open_low=False) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a [low, high] pair, got {value!r}")
    lo = _number(f"{name}[0]", value[0], low, high, open_low)
    hi = _number(f"{name}[1]", value[1], low, high, open_low)
    if lo > hi:
        raise ValueError(f"{name} must satisfy low <= high, got {list(value)}")
    return (lo, hi)


def _int_range(name: str, value, low: int, high: int | None = None, odd: bool = False) -> tuple:
    lo, hi = _range(name, value, low, high)
    if int(lo) != lo or int(hi) != hi or (odd and (lo % 2 != 1 or hi % 2 != 1)):
        raise ValueError(f"{name} must hold {'odd ' if odd else ''}integers, got {list(value)}")
    return (int(lo), int(hi))


def _distribution(name: str, value, length: int) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != length:
        raise ValueError(f"{name} must be a list of {length} probabilities, got {value!r}")
    probs = tuple(_probability(f"{name}[{i}]", p) for i, p in enumerate(value))
    if abs(sum(probs) - 1.0) > 1e-4:
        raise ValueError(f"{name} must sum to 1, got {list(value)} (sum {sum(probs):.6g})")
    return probs


def _kernel_list(name: str, value) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty list of kernel types from {KERNEL_TYPES}, got {value!r}")
    for kernel_type in value:
        if kernel_type not in KERNEL_TYPES:
            hint = " (sinc filters are chosen with sinc_prob / sinc_prob2)" if kernel_type == "sinc" else ""
            raise ValueError(f"{name} has unknown kernel type {kernel_type!r}{hint}; expected one of {KERNEL_TYPES}")
    return tuple(value)


# ------------------------------------------------------------------------------------------------------------
# Shared (de)serialisation
# ------------------------------------------------------------------------------------------------------------


class _ConfigIO:
    """``from_dict`` / ``to_dict`` / ``from_yaml`` / ``to_yaml`` for the frozen config dataclasses below."""

    def _validate(self) -> dict:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def __post_init__(self):
        for key, value in self._validate().items():
            object.__setattr__(self, key, value)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]):
        """Build from a mapping of option names; unknown keys raise ``ValueError`` (with a suggestion)."""
        if not isinstance(options, Mapping):
            raise TypeError(f"{cls.__name__} options must be a mapping, got {type(options).__name__}")
        names = cls.field_names()
        unknown = [key for key in options if key not in names]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), names, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(hints)}; valid options: {list(names)}")
        return cls(**dict(options))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every option, sequences as lists (YAML/JSON friendly); ``from_dict`` inverts it."""
        out = {}
        for name in self.field_names():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_yaml(cls, path: str | os.PathLike):
        """Read a YAML file whose top level maps option names to values (see ``configs/degradations/``)."""
        import yaml

        with open(path, encoding="utf-8") as handle:
            options = yaml.safe_load(handle)
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise TypeError(f"{path}: expected a mapping of {cls.__name__} options, got {type(options).__name__}")
        return cls.from_dict(options)

    def to_yaml(self, path: str | os.PathLike) -> None:
        import yaml

        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.to_dict(), handle, sort_keys=False)


# ------------------------------------------------------------------------------------------------------------
# Real-ESRGAN
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RealESRGANDegradationConfig(_ConfigIO):
    """All parameters of the Real-ESRGAN second-order degradation (Wang et al., 2021, Sec. 3, Fig. 2).

    Names and defaults are those of Real-ESRGAN's ``train_realesrnet_x4plus.yml``. Fields ending in ``2`` are
    the second-order copy of the first-stage field. Blur sigmas are in pixels, ``noise_range`` is the Gaussian
    sigma on the 0..255 scale, ``jpeg_range`` the JPEG quality, ``resize_prob`` the probabilities of
    ``[up, down, keep]``; ``resize_range = [low, high]`` gives down-scales in ``[low, 1]`` and up-scales in
    ``[1, high]``.

    Kernel sizes are drawn from the odd sizes ``7 .. blur_kernel_size`` (``7 .. blur_kernel_size2`` for the
    second stage and the final sinc) and zero-padded to ``max(blur_kernel_size, blur_kernel_size2)``; sinc
    cut-offs are ``U(pi/3, pi)`` for sizes below 13 and ``U(pi/5, pi)`` otherwise (``U(pi/3, pi)`` for the final
    sinc). Rotations are ``U(-pi, pi)``.

    Not in Real-ESRGAN (defaults reproduce it): ``noise_prob`` / ``noise_prob2`` and ``jpeg_prob`` /
    ``jpeg_prob2``, the probabilities that a stage adds noise / JPEG at all (Real-ESRGAN always does).
    """

    # the first degradation process
    blur_kernel_size: int = 21
    kernel_list: Sequence[str] = _ALL_KERNELS
    kernel_prob: Sequence[float] = _X4PLUS_KERNEL_PROB
    sinc_prob: float = 0.1
    blur_sigma: Sequence[float] = (0.2, 3.0)
    betag_range: Sequence[float] = (0.5, 4.0)
    betap_range: Sequence[float] = (1.0, 2.0)
    resize_prob: Sequence[float] = (0.2, 0.7, 0.1)
    resize_range: Sequence[float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: Sequence[float] = (1.0, 30.0)
    poisson_scale_range: Sequence[float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: Sequence[float] = (30.0, 95.0)
    # the second degradation process
    second_blur_prob: float = 0.8
    blur_kernel_size2: int = 21
    kernel_list2: Sequence[str] = _ALL_KERNELS
    kernel_prob2: Sequence[float] = _X4PLUS_KERNEL_PROB
    sinc_prob2: float = 0.1
    blur_sigma2: Sequence[float] = (0.2, 1.5)
    betag_range2: Sequence[float] = (0.5, 4.0)
    betap_range2: Sequence[float] = (1.0, 2.0)
    resize_prob2: Sequence[float] = (0.3, 0.4, 0.3)
    resize_range2: Sequence[float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: Sequence[float] = (1.0, 25.0)
    poisson_scale_range2: Sequence[float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: Sequence[float] = (30.0, 95.0)
    # the final sinc filter and the scale factor
    final_sinc_prob: float = 0.8
    scale: int = 4
    # extensions (1.0 = Real-ESRGAN)
    noise_prob: float = 1.0
    noise_prob2: float = 1.0
    jpeg_prob: float = 1.0
    jpeg_prob2: float = 1.0

    @property
    def kernel_pad_size(self) -> int:
        """Size every sampled kernel is zero-padded to (21 by default)."""
        return max(self.blur_kernel_size, self.blur_kernel_size2)

    def _validate(self) -> dict:
        v: dict[str, Any] = {}

        def check(name: str, validator, *args, **kwargs):
            v[name] = validator(name, getattr(self, name), *args, **kwargs)
            return v[name]

        for s in ("", "2"):
            check(f"blur_kernel_size{s}", _integer, 7, odd=True)
            kernel_list = check(f"kernel_list{s}", _kernel_list)
            check(f"kernel_prob{s}", _distribution, len(kernel_list))
            for name in ("blur_sigma", "betag_range", "betap_range"):
                check(name + s, _range, 0.0, open_low=True)
            check(f"resize_prob{s}", _distribution, 3)
            low, high = check(f"resize_range{s}", _range, 0.0, open_low=True)
            if not low <= 1.0 <= high:
                raise ValueError(
                    f"resize_range{s} must contain 1 (down-scales below, up-scales above), got {[low, high]}"
                )
            check(f"noise_range{s}", _range, 0.0)
            check(f"poisson_scale_range{s}", _range, 0.0)
            low, high = check(f"jpeg_range{s}", _range, 1.0, 100.0)
            if math.ceil(low) > math.floor(high):
                raise ValueError(f"jpeg_range{s} must contain an integer quality, got {[low, high]}")
            for name in ("sinc_prob", "gaussian_noise_prob", "gray_noise_prob", "noise_prob", "jpeg_prob"):
                check(name + s, _probability)
        check("second_blur_prob", _probability)
        check("final_sinc_prob", _probability)
        check("scale", _integer, 1)
        return v


# ------------------------------------------------------------------------------------------------------------
# BSRGAN
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BSRGANDegradationConfig(_ConfigIO):
    """All parameters of the BSRGAN shuffled degradation (Zhang et al., 2021, "Designing a Practical
    Degradation Model for Deep Blind Image Super-Resolution", Sec. 3, Fig. 2), defaults from its
    ``degradation_bsrgan``.

    With ``sf`` the current factor (``scale``, or 2 after the optional first half-size step taken with
    ``scale2_prob`` when ``scale == 4``): each of the two blurs is an anisotropic Gaussian with eigenvalues
    ``U(0, 4 + sf)`` (probability ``aniso_blur_prob``) or an isotropic one with sigma ``U(0, 2 + 0.2 sf)``,
    of odd size in ``blur_kernel_size_range``; the intermediate down-sample is a resize by ``1 / U(1, 2 sf)``
    (probability ``downsample2_resize_prob``) or a Gaussian blur with sigma ``U(0.1, 0.6 sf)`` followed by
    nearest sub-sampling by ``sf``. Gaussian noise has level ``noise_range`` (integers, 0..255 scale) and is
    colour, grey or channel-correlated with probabilities ``color_noise_prob``, ``gray_noise_prob`` and the
    rest. JPEG (quality ``jpeg_range``) is added with ``jpeg_prob`` inside the shuffle and always at the end;
    the camera ISP step runs with ``isp_prob`` when an ISP model is given.
    """

    scale: int = 4
    scale2_prob: float = 0.25
    aniso_blur_prob: float = 0.5
    blur_kernel_size_range: Sequence[int] = (7, 25)
    downsample2_resize_prob: float = 0.75
    noise_range: Sequence[int] = (2, 25)
    color_noise_prob: float = 0.4
    gray_noise_prob: float = 0.4
    jpeg_prob: float = 0.9
    jpeg_range: Sequence[int] = (30, 95)
    isp_prob: float = 0.25

    def _validate(self) -> dict:
        v: dict[str, Any] = {"scale": _integer("scale", self.scale, 1)}
        for name in ("scale2_prob", "aniso_blur_prob", "downsample2_resize_prob", "color_noise_prob"):
            v[name] = _probability(name, getattr(self, name))
        for name in ("gray_noise_prob", "jpeg_prob", "isp_prob"):
            v[name] = _probability(name, getattr(self, name))
        if v["color_noise_prob"] + v["gray_noise_prob"] > 1.0 + 1e-9:
            raise ValueError(
                "color_noise_prob + gray_noise_prob must be <= 1 (the rest is channel-correlated noise), got "
                f"{v['color_noise_prob']} + {v['gray_noise_prob']}"
            )
        v["blur_kernel_size_range"] = _int_range("blur_kernel_size_range", self.blur_kernel_size_range, 1, odd=True)
        v["noise_range"] = _int_range("noise_range", self.noise_range, 0)
        v["jpeg_range"] = _int_range("jpeg_range", self.jpeg_range, 1, 100)
        return v
