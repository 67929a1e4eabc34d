"""Diffusion schedulers in the diffusers style (``SchedulerMixin``, ``ConfigMixin``).

- :class:`ResShiftScheduler`: the residual-shifting chain of ResShift (Yue et al., NeurIPS 2023 and its 4-step
  journal extension), with the shipped settings in :data:`RESSHIFT_PRESETS`.
"""

from .scheduling_resshift import (
    RESSHIFT_PRESET_ALIASES,
    RESSHIFT_PRESET_INFO,
    RESSHIFT_PRESETS,
    ResShiftScheduler,
    ResShiftSchedulerOutput,
    resshift_spaced_timesteps,
    resshift_sqrt_eta_schedule,
)

__all__ = [
    "RESSHIFT_PRESETS",
    "RESSHIFT_PRESET_ALIASES",
    "RESSHIFT_PRESET_INFO",
    "ResShiftScheduler",
    "ResShiftSchedulerOutput",
    "resshift_spaced_timesteps",
    "resshift_sqrt_eta_schedule",
]
