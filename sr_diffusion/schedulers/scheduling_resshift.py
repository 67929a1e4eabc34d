"""ResShift: the residual-shifting Markov chain between the HR image and the upsampled LR image.

Paper: Z. Yue, J. Wang, C. C. Loy, "ResShift: Efficient Diffusion Model for Image Super-resolution by
Residual Shifting", NeurIPS 2023 (15 steps), and its journal extension "Efficient Diffusion Model for
Image Restoration by Residual Shifting" (TPAMI 2024, 4 steps). Notation of the paper (Sec. 2); the equations
are labelled R1-R4 here:

- ``x_0`` the HR target, ``y_0`` the LR input upsampled to the size of ``x_0`` (or both encoded into the
  latent space of an autoencoder), ``e_0 = y_0 - x_0`` the residual;
- ``eta_1 < eta_2 < ... < eta_T`` the shifting schedule, ``alpha_t = eta_t - eta_{t-1}`` with ``eta_0 = 0``
  (so ``alpha_1 = eta_1``), ``kappa`` a hyper-parameter scaling the noise variance;
- transition (R1): ``q(x_t | x_{t-1}, y_0) = N(x_{t-1} + alpha_t e_0, kappa^2 alpha_t I)``;
- marginal (R2): ``q(x_t | x_0, y_0) = N(x_0 + eta_t e_0, kappa^2 eta_t I)``;
- posterior (R3): ``q(x_{t-1} | x_t, x_0, y_0) = N((eta_{t-1}/eta_t) x_t + (alpha_t/eta_t) x_0,
  kappa^2 (eta_{t-1}/eta_t) alpha_t I)``;
- prior (R4): ``x_T = y_0 + kappa sqrt(eta_T) noise``, ``noise ~ N(0, I)``.

Indexing follows the reference code: the paper's step ``t = 1..T`` is the integer timestep ``t - 1``
(``0..T-1``), which is also what the denoiser receives. All tensors may have any shape ``(N, ...)``:
``(N, 3, H, W)`` images in pixel space or ``(N, C, h, w)`` VQ/KL latents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from sr_diffusion.utils import is_int

__all__ = [
    "RESSHIFT_PRESETS",
    "RESSHIFT_PRESET_ALIASES",
    "RESSHIFT_PRESET_INFO",
    "ResShiftScheduler",
    "ResShiftSchedulerOutput",
    "resshift_spaced_timesteps",
    "resshift_sqrt_eta_schedule",
]

_PREDICTION_TYPES = ("sample", "epsilon", "epsilon_scale", "residual")
_ETA_SCHEDULES = ("exponential",)
_INPUT_SCALINGS = ("std", "max")
_TIMESTEP_SPACINGS = ("leading", "trailing")


# ----------------------------------------------------------------------------------------------------------------------
# Presets: the diffusion settings of the configurations shipped with the reference implementation
# (github.com/zsyOAOA/ResShift). Every number below is read from the file and lines given in RESSHIFT_PRESET_INFO.
# ----------------------------------------------------------------------------------------------------------------------

_REFERENCE_HEAD = "3ce1d81e8402fd50083809ae288a3977f6921bdd"  # last commit of the reference repository (2024-03-13)
_REFERENCE_LEGACY = "92ca23cf82d7ffeba5c5d900e7e2e0fa4e9d1c67"  # last commit with the 15-step bicubic config

_COMMON = {
    "power": 0.3,
    "etas_end": 0.99,
    "eta_schedule": "exponential",
    "prediction_type": "sample",
    "normalize_input": True,
    "input_scaling": "std",
    "latent_scale_factor": 1.0,
}

RESSHIFT_PRESETS: dict[str, dict[str, Any]] = {
    # Real-world x4 SR, conference paper (checkpoints v1 and v2), 15 steps.
    "realsr_swinunet_realesrgan256": {**_COMMON, "num_train_timesteps": 15, "kappa": 2.0, "min_noise_level": 0.04},
    # Real-world x4 SR, journal extension (checkpoint v3), 4 steps.
    "realsr_swinunet_realesrgan256_journal": {
        **_COMMON,
        "num_train_timesteps": 4,
        "kappa": 2.0,
        "min_noise_level": 0.2,
    },
    # Real-world x2 SR, 4 steps.
    "realsr_realesrgan256_x2": {**_COMMON, "num_train_timesteps": 4, "kappa": 2.0, "min_noise_level": 0.2},
    # Bicubic x4 SR, journal extension (checkpoint "bicsr"), 4 steps.
    "bicx4_swinunet_lpips": {**_COMMON, "num_train_timesteps": 4, "kappa": 2.0, "min_noise_level": 0.2},
    # Bicubic x4 SR, conference paper, 15 steps, kappa = 1. The config file says min_noise_level 0.04, but the code of
    # that time capped sqrt(eta_1) at sqrt(0.001) (models/gaussian_diffusion.py@ccfad91, line 51), so with kappa = 1 the
    # effective value, which is what we store, is sqrt(0.001) = 0.0316...
    "bicubic_swinunet_bicubic256": {
        **_COMMON,
        "num_train_timesteps": 15,
        "kappa": 1.0,
        "min_noise_level": math.sqrt(0.001),
    },
}
"""Scheduler settings of the shipped ResShift configurations, by the name of the original config file."""

RESSHIFT_PRESET_ALIASES: dict[str, str] = {
    "v1": "realsr_swinunet_realesrgan256",
    "v2": "realsr_swinunet_realesrgan256",
    "v3": "realsr_swinunet_realesrgan256_journal",
    "bicsr": "bicx4_swinunet_lpips",
}
"""Checkpoint names of the reference ``inference_resshift.py`` (``_STEP``/``_LINK``) mapped to their preset."""

RESSHIFT_PRESET_INFO: dict[str, dict[str, Any]] = {
    "realsr_swinunet_realesrgan256": {
        "source": f"configs/realsr_swinunet_realesrgan256.yaml@{_REFERENCE_HEAD[:7]}, lines 29-45",
        "sr_scale": 4,
        "autoencoder": "VQ-f4 (embed_dim 3, n_embed 8192)",
        "checkpoints": ("v1", "v2"),
    },
    "realsr_swinunet_realesrgan256_journal": {
        "source": f"configs/realsr_swinunet_realesrgan256_journal.yaml@{_REFERENCE_HEAD[:7]}, lines 53-69",
        "sr_scale": 4,
        "autoencoder": "VQ-f4 (embed_dim 3, n_embed 8192)",
        "checkpoints": ("v3",),
    },
    "realsr_realesrgan256_x2": {
        "source": f"configs/realsr_realesrgan256_x2.yaml@{_REFERENCE_HEAD[:7]}, lines 52-68",
        "sr_scale": 2,
        "autoencoder": "VQ-f4 (embed_dim 3, n_embed 8192)",
        "checkpoints": (),
    },
    "bicx4_swinunet_lpips": {
        "source": f"configs/bicx4_swinunet_lpips.yaml@{_REFERENCE_HEAD[:7]}, lines 52-68",
        "sr_scale": 4,
        "autoencoder": "VQ-f4 (embed_dim 3, n_embed 8192)",
        "checkpoints": ("bicsr",),
    },
    "bicubic_swinunet_bicubic256": {
        "source": (
            f"configs/bicubic_swinunet_bicubic256.yaml@{_REFERENCE_LEGACY[:7]}, lines 26-42 (removed in 8e2b517); "
            "sqrt(eta_1) cap from models/gaussian_diffusion.py@ccfad91, line 51"
        ),
        "sr_scale": 4,
        "autoencoder": "VQ-f4 (embed_dim 3, n_embed 8192)",
        "checkpoints": (),
    },
}
"""Where each preset's numbers come from, and what the original pairs it with (not used by the scheduler)."""


# ----------------------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------------------


def resshift_sqrt_eta_schedule(
    num_train_timesteps: int, min_noise_level: float, etas_end: float, kappa: float, power: float
) -> torch.Tensor:
    """The "exponential" shifting schedule of ResShift (the paper's noise schedule), as ``sqrt(eta_t)``, t = 1..T.

    ``sqrt(eta_t) = sqrt(eta_1) * (sqrt(eta_T) / sqrt(eta_1)) ** (((t - 1) / (T - 1)) ** power)``, i.e.
    ``sqrt(eta_1) * b_0 ** beta_t`` with ``b_0 = (sqrt(eta_T)/sqrt(eta_1)) ** (1/(T-1))`` and
    ``beta_t = ((t-1)/(T-1)) ** p * (T-1)``. As in the reference code, the end points are
    ``sqrt(eta_1) = min(min_noise_level / kappa, min_noise_level)`` (so that the noise level of the first step,
    ``kappa * sqrt(eta_1)``, is ``min_noise_level`` whenever ``kappa >= 1``) and ``sqrt(eta_T) = etas_end``.

    Returns:
        A float64 tensor of shape ``(T,)``, increasing.
    """
    if num_train_timesteps < 2:
        raise ValueError(f"The exponential schedule needs num_train_timesteps >= 2, got {num_train_timesteps}.")
    if not (min_noise_level > 0 and etas_end > 0 and kappa > 0 and power > 0):
        raise ValueError(
            "min_noise_level, etas_end, kappa and power must be > 0, got "
            f"{min_noise_level=}, {etas_end=}, {kappa=}, {power=}."
        )
    sqrt_eta_first = min(min_noise_level / kappa, min_noise_level)
    progress = torch.linspace(0.0, 1.0, num_train_timesteps, dtype=torch.float64) ** power
    return sqrt_eta_first * (etas_end / sqrt_eta_first) ** progress


def resshift_spaced_timesteps(
    num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str = "trailing"
) -> torch.Tensor:
    """The ``num_inference_steps`` trained timesteps a shorter chain keeps, decreasing (:meth:`ResShiftScheduler.
    set_timesteps`): ``"leading"``: ``int(x · T / S)`` for ``x = 0..S-1``, the reference ``models/respace.py``
    ``space_timesteps(T, S)`` (``ResShift@3ce1d81``); ``"trailing"``: ``round(T - x · T / S) - 1``, which always starts
    at ``T - 1``. Both are ``[T-1, ..., 0]`` for ``S = T``.

    Args:
        num_train_timesteps: ``T``. num_inference_steps: ``S``, an int in ``[1, T]``.
        timestep_spacing: ``"leading"`` or ``"trailing"``.

    Returns:
        A ``(S,)`` long tensor, strictly decreasing.
    """
    if timestep_spacing not in _TIMESTEP_SPACINGS:
        raise ValueError(f"Unknown timestep_spacing {timestep_spacing!r}; expected one of {_TIMESTEP_SPACINGS}.")
    if not is_int(num_inference_steps):
        raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}.")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps} (ResShift cannot "
            f"sample more steps than it was trained with), got {num_inference_steps}."
        )
    stride = num_train_timesteps / num_inference_steps
    if timestep_spacing == "leading":
        kept = [int(stride * x) for x in range(num_inference_steps)]
    else:
        kept = [math.floor(num_train_timesteps - stride * x + 0.5) - 1 for x in range(num_inference_steps)]
    return torch.tensor(sorted(set(kept), reverse=True), dtype=torch.long)


@dataclass
class ResShiftSchedulerOutput(BaseOutput):
    """Output of :meth:`ResShiftScheduler.step`.

    Args:
        prev_sample (`torch.Tensor` of the sample's shape):
            ``x_{t-1}``, drawn from the posterior with the predicted ``x_0``; the next model input.
        pred_original_sample (`torch.Tensor` of the sample's shape):
            The predicted ``x_0`` (after ``clip_sample``, if set).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class ResShiftScheduler(SchedulerMixin, ConfigMixin):
    """The residual-shifting diffusion of ResShift (Yue et al., NeurIPS 2023; journal version with 4 steps).

    The chain moves from ``x_0`` (HR, or its latent) to ``y_0`` (the upsampled LR image, or its latent) by shifting
    the residual ``e_0 = y_0 - x_0``: ``q(x_t | x_0, y_0) = N(x_0 + eta_t e_0, kappa^2 eta_t I)``. Sampling starts
    at ``x_T = y_0 + kappa sqrt(eta_T) noise`` (:meth:`prior_sample`) and runs the posterior of (R3) with the
    predicted ``x_0`` (:meth:`step`); the last step adds no noise. See the module docstring for the notation.

    Args:
        num_train_timesteps (`int`, defaults to 15): ``T``; the model sees integer timesteps ``0..T-1``.
        kappa (`float`, defaults to 2.0): noise scale; the variance of ``x_t`` is ``kappa^2 eta_t``.
        power (`float`, defaults to 0.3): exponent ``p`` of the exponential schedule.
        min_noise_level (`float`, defaults to 0.04): ``sqrt(eta_1) = min(min_noise_level / kappa, min_noise_level)``.
        etas_end (`float`, defaults to 0.99): ``sqrt(eta_T)`` (the reference code's ``etas_end`` is the square root,
            so ``eta_T = 0.9801`` by default).
        eta_schedule (`str`, defaults to ``"exponential"``): the only named schedule of the reference code (its other
            one, ``"ldm"``, loads a table: pass such a table as ``trained_sqrt_etas``).
        trained_sqrt_etas (`list[float]`, *optional*): an explicit increasing ``sqrt(eta_t)`` table of length ``T`` in
            ``(0, 1]``; when given it replaces the named schedule.
        prediction_type (`str`, defaults to ``"sample"``): what the model predicts: ``"sample"`` (``x_0``, all shipped
            models), ``"epsilon"`` (the noise), ``"epsilon_scale"`` (``kappa sqrt(eta_t)`` times the noise) or
            ``"residual"`` (``y_0 - x_0``).
        normalize_input (`bool`, defaults to True): divide the model input by its expected scale
            (:meth:`scale_model_input`).
        input_scaling (`str`, defaults to ``"std"``): ``"std"`` divides by ``sqrt(kappa^2 eta_t + 1)`` (the reference
            code with ``latent_flag=True``, every shipped config); ``"max"`` divides by ``3 kappa sqrt(eta_t) + 1``
            (``latent_flag=False``, meant for pixel space).
        clip_sample (`bool`, defaults to False): clamp the predicted ``x_0`` to ``[-clip_sample_range,
            clip_sample_range]``; the reference sampler does so in pixel space only (not for latents).
        clip_sample_range (`float`, defaults to 1.0): see ``clip_sample``.
        timestep_spacing (`str`, defaults to ``"trailing"``): which trained timesteps a shorter sampling chain keeps,
            see :meth:`set_timesteps` (irrelevant for the full chain, the reference default).
        latent_scale_factor (`float`, defaults to 1.0): the reference code's ``scale_factor``: latents of the
            autoencoder are multiplied by it before diffusion and divided by it before decoding. Stored for the
            pipeline; the scheduler never applies it.
    """

    _compatibles: list[str] = []
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 15,
        kappa: float = 2.0,
        power: float = 0.3,
        min_noise_level: float = 0.04,
        etas_end: float = 0.99,
        eta_schedule: Literal["exponential"] = "exponential",
        trained_sqrt_etas: list[float] | None = None,
        prediction_type: Literal["sample", "epsilon", "epsilon_scale", "residual"] = "sample",
        normalize_input: bool = True,
        input_scaling: Literal["std", "max"] = "std",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: Literal["leading", "trailing"] = "trailing",
        latent_scale_factor: float = 1.0,
    ):
        if not is_int(num_train_timesteps) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}.")
        if not kappa > 0:
            raise ValueError(f"kappa must be > 0, got {kappa}.")
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected one of {_PREDICTION_TYPES}.")
        if input_scaling not in _INPUT_SCALINGS:
            raise ValueError(f"Unknown input_scaling {input_scaling!r}; expected one of {_INPUT_SCALINGS}.")
        if timestep_spacing not in _TIMESTEP_SPACINGS:
            raise ValueError(f"Unknown timestep_spacing {timestep_spacing!r}; expected one of {_TIMESTEP_SPACINGS}.")

        if trained_sqrt_etas is not None:
            sqrt_etas = torch.as_tensor(trained_sqrt_etas, dtype=torch.float64).flatten()
            if sqrt_etas.numel() != num_train_timesteps:
                raise ValueError(
                    f"trained_sqrt_etas has {sqrt_etas.numel()} entries but num_train_timesteps is "
                    f"{num_train_timesteps}."
                )
        elif eta_schedule == "exponential":
            sqrt_etas = resshift_sqrt_eta_schedule(num_train_timesteps, min_noise_level, etas_end, kappa, power)
        else:
            raise ValueError(f"Unknown eta_schedule {eta_schedule!r}; expected one of {_ETA_SCHEDULES}.")
        if not (sqrt_etas[0] > 0 and sqrt_etas[-1] <= 1 and bool(torch.all(sqrt_etas[1:] > sqrt_etas[:-1]))):
            raise ValueError(f"sqrt(eta_t) must increase strictly within (0, 1], got {sqrt_etas.tolist()}.")
        if prediction_type in ("epsilon", "epsilon_scale") and sqrt_etas[-1] >= 1:
            raise ValueError(f"prediction_type {prediction_type!r} needs eta_T < 1 to recover x_0 (1 - eta_T divides).")

        # Schedule tensors in float64 on the CPU (paper notation); cast to the sample's dtype/device on use.
        self.sqrt_etas = sqrt_etas
        self.etas = sqrt_etas**2
        self.etas_prev = torch.cat([sqrt_etas.new_zeros(1), self.etas[:-1]])
        self.alphas = self.etas - self.etas_prev

        # Settable values (set_timesteps).
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self._prev_timestep = self._previous_table(self.timesteps)

    # ------------------------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ResShiftScheduler:
        """A scheduler with the settings of a shipped ResShift configuration.

        Args:
            name: a key of :data:`RESSHIFT_PRESETS` (the original config file's name) or of
                :data:`RESSHIFT_PRESET_ALIASES` (``"v1"``, ``"v2"``, ``"v3"``, ``"bicsr"``).
            overrides: config values to change, e.g. ``clip_sample=True`` for a pixel-space model.
        """
        key = RESSHIFT_PRESET_ALIASES.get(name, name)
        if key not in RESSHIFT_PRESETS:
            known = sorted(RESSHIFT_PRESETS) + sorted(RESSHIFT_PRESET_ALIASES)
            raise ValueError(f"Unknown ResShift preset {name!r}; known presets: {known}.")
        return cls(**{**RESSHIFT_PRESETS[key], **overrides})

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------------------------------------------------------
    # Timesteps
    # ------------------------------------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Choose the chain run at inference.

        ResShift is trained for, and normally sampled with, all ``T`` steps (``num_inference_steps=None`` or ``T``):
        ``timesteps = [T-1, ..., 0]``. A shorter chain keeps a subset ``t_1 < ... < t_S`` of the trained timesteps and
        is exact, not an approximation: the marginals ``q(x_t | x_0, y_0)`` depend on ``eta_t`` alone, so the chain
        with shifting schedule ``eta_{t_1} < ... < eta_{t_S}`` has the same marginals at the kept steps, and its
        posterior is (R3) with ``eta_{t-1}`` replaced by the previous kept ``eta`` (0 after the last one). This is
        the reference code's ``timestep_respacing`` (``models/respace.py``), where the model also receives the
        original timestep indices. Sampling starts from the prior ``N(y_0, kappa^2 eta I)`` at the first kept
        step, which approximates the true marginal (mean ``x_0 + eta e_0``) only where ``eta`` is close to 1, i.e. at
        ``T-1``. Which timesteps are kept:

        - ``"trailing"`` (default): ``round(T - x * T / S) - 1`` for ``x = 0..S-1``; always starts at ``T-1``, where
          the prior is the one the model was trained for.
        - ``"leading"``: ``int(x * T / S)``, the reference ``space_timesteps``; always keeps 0 but starts at
          ``int((S - 1) T / S) < T-1`` when ``S < T`` (e.g. 12 for ``T=15, S=5``), where ``eta`` is well below 1 and
          the prior's mean ``y_0`` is off by ``(1 - eta) e_0``. Kept to reproduce the reference code.

        Or ``timesteps``, the chain itself (diffusers' custom timesteps): any strictly decreasing subset of the trained
        timesteps, e.g. ``[3, 1]`` of ``T = 4``; starting below ``T-1`` starts from the approximate prior above.

        Args:
            num_inference_steps: ``S`` with ``1 <= S <= T``; ``None`` means ``T`` (or ``len(timesteps)``).
            device: where to put ``self.timesteps``.
            timesteps: the kept timesteps, strictly decreasing, in ``[0, T-1]``; not with ``num_inference_steps``.
        """
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("Give either num_inference_steps or timesteps, not both.")
            chain = self.check_timesteps(timesteps)
        else:
            chain = self._spaced_timesteps(num_inference_steps)
        self.num_inference_steps = len(chain)
        self._prev_timestep = self._previous_table(chain)
        self.timesteps = chain.to(device)

    def _spaced_timesteps(self, num_inference_steps: int | None) -> torch.Tensor:
        """The ``"leading"`` / ``"trailing"`` chain of ``num_inference_steps`` steps (:meth:`set_timesteps`)."""
        num_train = self.config.num_train_timesteps
        if num_inference_steps is None:
            num_inference_steps = num_train
        return resshift_spaced_timesteps(num_train, num_inference_steps, self.config.timestep_spacing)

    def check_timesteps(self, timesteps: Sequence[int]) -> torch.Tensor:
        """``timesteps`` as a ``(S,)`` long tensor if they are a valid custom chain (non-empty, ints, strictly
        decreasing, within the ``T`` trained timesteps), else a ``ValueError`` saying what is wrong."""
        num_train = self.config.num_train_timesteps
        values = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps
        if (
            not isinstance(values, Sequence)
            or isinstance(values, str)
            or not values
            or any(not is_int(t) for t in values)
        ):
            raise ValueError(f"timesteps must be a non-empty list of ints, got {timesteps!r}.")
        if any(a <= b for a, b in zip(values, values[1:])) or not 0 <= values[-1] <= values[0] < num_train:
            raise ValueError(
                f"timesteps must be strictly decreasing trained timesteps in [0, {num_train - 1}], got {list(values)}."
            )
        return torch.tensor(values, dtype=torch.long)

    def _previous_table(self, timesteps: torch.Tensor) -> torch.Tensor:
        """For each trained timestep: the previous one in ``timesteps`` (-1: x_0 follows; -2: not in the chain)."""
        table = torch.full((self.config.num_train_timesteps,), -2, dtype=torch.long)
        ordered = timesteps.cpu().tolist()
        for current, previous in zip(ordered, ordered[1:] + [-1]):
            table[current] = previous
        return table

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The timestep that follows ``timestep`` in the current chain (-1 after the last one)."""
        index = self._timestep_index(timestep, "timestep")
        previous = self._prev_timestep[index]
        if bool(torch.any(previous == -2)):
            raise ValueError(
                f"Timestep {timestep} is not in the current chain {self.timesteps.tolist()} (see set_timesteps)."
            )
        return int(previous) if isinstance(timestep, int) else previous

    # ------------------------------------------------------------------------------------------------------------------
    # Closed forms (paper Eqs. 2-4)
    # ------------------------------------------------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Normalise the denoiser's input as the reference code does (``_scale_input``).

        ``x_t / sqrt(kappa^2 eta_t + 1)`` (``input_scaling="std"``: the standard deviation of ``x_t`` for unit-variance
        data such as the VQ latents) or ``x_t / (3 kappa sqrt(eta_t) + 1)`` (``"max"``); ``x_t`` itself when
        ``normalize_input`` is False.

        Args:
            sample: ``x_t``, shape ``(N, ...)``.
            timestep: an int, or a tensor of shape ``()`` or ``(N,)``.
        """
        if not self.config.normalize_input:
            return sample
        if timestep is None:
            raise ValueError("scale_model_input needs the timestep when normalize_input is True.")
        index = self._timestep_index(timestep, "timestep", batch_size=sample.shape[0])
        if self.config.input_scaling == "std":
            scale = torch.sqrt(self.config.kappa**2 * self.etas + 1.0)
        else:
            scale = 3.0 * self.config.kappa * self.sqrt_etas + 1.0
        return sample / self._gather(scale, index, sample)

    def get_marginal_mean_variance(
        self, x0: torch.Tensor, y0: torch.Tensor, timesteps: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``q(x_t | x_0, y_0) = N(x_0 + eta_t (y_0 - x_0), kappa^2 eta_t I)`` (R2).

        Args:
            x0: ``x_0``, shape ``(N, ...)``. y0: ``y_0``, same shape. timesteps: int, or tensor ``()`` or ``(N,)``.

        Returns:
            ``(mean, variance)``, both of ``x0``'s shape.
        """
        self._check_same_shape(x0, y0, "x0", "y0")
        index = self._timestep_index(timesteps, "timesteps", batch_size=x0.shape[0])
        eta = self._gather(self.etas, index, x0)
        mean = x0 + eta * (y0 - x0)
        variance = (self.config.kappa**2 * eta).expand_as(x0)
        return mean, variance

    def get_posterior_mean_variance(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        timesteps: int | torch.Tensor,
        prev_timesteps: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of the posterior ``q(x_s | x_t, x_0, y_0)`` from ``t`` to the previous step ``s`` (R3).

        ``mean = (eta_s / eta_t) x_t + ((eta_t - eta_s) / eta_t) x_0``, ``variance = kappa^2 (eta_s / eta_t)
        (eta_t - eta_s)``; with ``s = t - 1`` this is the paper's ``(eta_{t-1}/eta_t) x_t + (alpha_t/eta_t) x_0`` and
        ``kappa^2 (eta_{t-1}/eta_t) alpha_t``. ``y_0`` drops out. ``s = -1`` means ``eta_s = 0``: mean ``x_0``,
        variance 0.

        Args:
            x0: ``x_0`` (or its prediction), shape ``(N, ...)``. x_t: ``x_t``, same shape.
            timesteps: ``t``, int or tensor ``()`` or ``(N,)``.
            prev_timesteps: ``s < t`` (or -1); by default the previous step of the current chain
                (:meth:`previous_timestep`; ``t - 1`` unless :meth:`set_timesteps` chose a shorter chain).

        Returns:
            ``(mean, variance)``, both of ``x_t``'s shape.
        """
        self._check_same_shape(x0, x_t, "x0", "x_t")
        index = self._timestep_index(timesteps, "timesteps", batch_size=x_t.shape[0])
        if prev_timesteps is None:
            prev_index = self._prev_timestep[index]
            if bool(torch.any(prev_index == -2)):
                raise ValueError(
                    f"Timesteps {index.tolist()} are not all in the current chain {self.timesteps.tolist()} "
                    "(see set_timesteps), or pass prev_timesteps."
                )
        else:
            prev_index = torch.as_tensor(prev_timesteps, dtype=torch.long).cpu().reshape(-1)
            if prev_index.numel() not in (1, index.numel()) or bool(torch.any(prev_index < -1)):
                raise ValueError(f"prev_timesteps must be -1 or a timestep per sample, got {prev_timesteps}.")
            if bool(torch.any(prev_index >= index)):
                raise ValueError(
                    f"prev_timesteps {prev_index.tolist()} must be smaller than timesteps {index.tolist()}."
                )
        return self._posterior(x0, x_t, index, prev_index)

    def _posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor, prev_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eta_t = self.etas[index]
        eta_s = torch.where(prev_index >= 0, self.etas[prev_index.clamp(min=0)], torch.zeros_like(eta_t))
        coef_xt = eta_s / eta_t
        coef_x0 = (eta_t - eta_s) / eta_t
        variance = self.config.kappa**2 * coef_xt * (eta_t - eta_s)
        mean = self._broadcast(coef_xt, x_t) * x_t + self._broadcast(coef_x0, x_t) * x0
        return mean, self._broadcast(variance, x_t).expand_as(x_t)

    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: int | torch.Tensor,
        lr_samples: torch.Tensor,
    ) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x_0, y_0)``: ``x_0 + eta_t (y_0 - x_0) + kappa sqrt(eta_t) noise`` (R2, q_sample).

        Unlike the DDPM ``add_noise``, ResShift's forward process also needs ``y_0``, passed as ``lr_samples``.

        Args:
            original_samples: ``x_0``, shape ``(N, ...)``.
            noise: standard normal noise of the same shape.
            timesteps: int, or tensor ``()`` or ``(N,)`` of integer timesteps in ``[0, T-1]``.
            lr_samples: ``y_0``, the LR image upsampled to (or encoded into) the shape of ``x_0``.

        Returns:
            ``x_t``, of ``original_samples``' shape and dtype.
        """
        self._check_same_shape(original_samples, lr_samples, "original_samples", "lr_samples")
        self._check_same_shape(original_samples, noise, "original_samples", "noise")
        index = self._timestep_index(timesteps, "timesteps", batch_size=original_samples.shape[0])
        eta = self._gather(self.etas, index, original_samples)
        std = self._gather(self.config.kappa * self.sqrt_etas, index, original_samples)
        return original_samples + eta * (lr_samples - original_samples) + std * noise

    def prior_sample(
        self,
        lr_samples: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """The start of sampling, ``x_T = y_0 + kappa sqrt(eta_T) noise`` (R4).

        ``T`` is the first timestep of the current chain (``self.timesteps[0]``, ``T-1`` in 0-based indexing unless a
        shorter ``"leading"`` chain starts lower).

        Args:
            lr_samples: ``y_0``, shape ``(N, ...)``.
            noise: standard normal noise of the same shape; drawn with ``generator`` when None.
            generator: ``torch.Generator`` (or one per sample) for the noise.
        """
        if noise is None:
            noise = randn_tensor(
                lr_samples.shape, generator=generator, device=lr_samples.device, dtype=lr_samples.dtype
            )
        self._check_same_shape(lr_samples, noise, "lr_samples", "noise")
        first = int(self.timesteps[0])
        std = self.config.kappa * float(self.sqrt_etas[first])
        return lr_samples + std * noise.to(device=lr_samples.device, dtype=lr_samples.dtype)

    # ------------------------------------------------------------------------------------------------------------------
    # Model output conversions
    # ------------------------------------------------------------------------------------------------------------------

    def predict_original_sample(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        timestep: int | torch.Tensor,
        lr_samples: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x_0`` from the model output, by ``prediction_type`` (R2 solved for ``x_0``; no clipping).

        - ``"sample"``: the output itself;
        - ``"residual"``: ``y_0 - output``;
        - ``"epsilon"``: ``(x_t - kappa sqrt(eta_t) output - eta_t y_0) / (1 - eta_t)``;
        - ``"epsilon_scale"``: ``(x_t - output - eta_t y_0) / (1 - eta_t)``.
        """
        self._check_same_shape(sample, model_output, "sample", "model_output")
        prediction_type = self.config.prediction_type
        if prediction_type == "sample":
            return model_output
        if lr_samples is None:
            raise ValueError(f"prediction_type {prediction_type!r} needs lr_samples (y_0) to recover x_0.")
        self._check_same_shape(sample, lr_samples, "sample", "lr_samples")
        if prediction_type == "residual":
            return lr_samples - model_output
        index = self._timestep_index(timestep, "timestep", batch_size=sample.shape[0])
        eta = self._gather(self.etas, index, sample)
        noise_part = model_output
        if prediction_type == "epsilon":
            noise_part = self._gather(self.config.kappa * self.sqrt_etas, index, sample) * model_output
        return (sample - noise_part - eta * lr_samples) / (1.0 - eta)

    def get_training_target(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: int | torch.Tensor,
        lr_samples: torch.Tensor,
    ) -> torch.Tensor:
        """The regression target of the model for ``x_t = add_noise(original_samples, noise, timesteps, lr_samples)``.

        ``x_0`` (``"sample"``), ``noise`` (``"epsilon"``), ``kappa sqrt(eta_t) noise`` (``"epsilon_scale"``) or
        ``y_0 - x_0`` (``"residual"``), as in the reference ``training_losses``.
        """
        self._check_same_shape(original_samples, lr_samples, "original_samples", "lr_samples")
        self._check_same_shape(original_samples, noise, "original_samples", "noise")
        prediction_type = self.config.prediction_type
        if prediction_type == "sample":
            return original_samples
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "residual":
            return lr_samples - original_samples
        index = self._timestep_index(timesteps, "timesteps", batch_size=original_samples.shape[0])
        return self._gather(self.config.kappa * self.sqrt_etas, index, original_samples) * noise

    # ------------------------------------------------------------------------------------------------------------------
    # Sampling step
    # ------------------------------------------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        lr_samples: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> ResShiftSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One reverse step ``x_t -> x_{t-1} ~ q(x_{t-1} | x_t, x0_pred)`` (R3 with the predicted ``x_0``).

        The step to ``x_0`` (from the last timestep of the chain, ``0`` for the full chain) returns the posterior mean
        without noise, as in the reference sampler, so a perfect ``x_0`` predictor ends exactly on ``x_0``.

        Args:
            model_output: the denoiser's output for ``scale_model_input(sample, timestep)``, shape ``(N, ...)``.
            timestep: the current timestep, one of ``self.timesteps`` (int, tensor ``()`` or ``(N,)``).
            sample: ``x_t``, shape ``(N, ...)``.
            lr_samples: ``y_0``, same shape; needed unless ``prediction_type="sample"`` (checked when given).
            generator: ``torch.Generator`` (or one per sample) for the posterior noise.
            return_dict: return a :class:`ResShiftSchedulerOutput` rather than a tuple.

        Returns:
            :class:`ResShiftSchedulerOutput` or ``(prev_sample, pred_original_sample)``.
        """
        if lr_samples is not None:
            self._check_same_shape(sample, lr_samples, "sample", "lr_samples")
        index = self._timestep_index(timestep, "timestep", batch_size=sample.shape[0])
        prev_index = self._prev_timestep[index]
        if bool(torch.any(prev_index == -2)):
            raise ValueError(
                f"Timestep {index.tolist()} is not in the current chain {self.timesteps.tolist()} (see set_timesteps)."
            )

        # 1. x_0 from the model output
        pred_original_sample = self.predict_original_sample(model_output, sample, timestep, lr_samples)
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-limit, limit)

        # 2. posterior mean and variance, 3. add noise except on the step to x_0
        mean, variance = self._posterior(pred_original_sample, sample, index, prev_index)
        prev_sample = mean
        if bool(torch.any(prev_index >= 0)):
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = mean + variance.sqrt() * noise  # variance is 0 where prev_index == -1

        if not return_dict:
            return prev_sample, pred_original_sample
        return ResShiftSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    # ------------------------------------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------------------------------------

    def _timestep_index(self, timesteps: int | torch.Tensor, name: str, batch_size: int | None = None) -> torch.Tensor:
        """Integer timesteps as a 1-D CPU long tensor of length 1 or ``batch_size``, checked to lie in ``[0, T-1]``."""
        if isinstance(timesteps, bool):
            raise ValueError(f"{name} must be an int or an integer tensor, got {timesteps!r}.")
        values = torch.as_tensor(timesteps).detach().cpu().reshape(-1)
        if values.numel() == 0:
            raise ValueError(f"{name} is empty.")
        if values.is_floating_point():
            if not bool(torch.all(values == values.round())):
                raise ValueError(f"{name} must hold integer timesteps, got {values.tolist()}.")
        elif values.dtype == torch.bool or values.is_complex():
            raise ValueError(f"{name} must hold integer timesteps, got {values.tolist()}.")
        index = values.long()
        num_train = self.config.num_train_timesteps
        if bool(torch.any(index < 0)) or bool(torch.any(index >= num_train)):
            raise ValueError(f"{name} {index.tolist()} out of range: ResShift timesteps are 0..{num_train - 1}.")
        if batch_size is not None and index.numel() not in (1, batch_size):
            raise ValueError(f"{name} has {index.numel()} entries for a batch of {batch_size}.")
        return index

    @staticmethod
    def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A float64 CPU vector of length 1 or N as a ``(N or 1, 1, ..., 1)`` tensor in ``like``'s dtype and device."""
        values = values.to(like.dtype if like.is_floating_point() else torch.float32)
        return values.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))

    def _gather(self, table: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._broadcast(table[index], like)

    @staticmethod
    def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
        if a.shape != b.shape:
            raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}.")
