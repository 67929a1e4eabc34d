from .pipeline_pasd import (
    PASD_ADDED_PROMPT,
    PASD_NEGATIVE_PROMPT,
    PASDPipeline,
    paca_contexts,
    pasd_noise_pred,
    pasd_scheduler,
)

__all__ = [
    "PASD_ADDED_PROMPT",
    "PASD_NEGATIVE_PROMPT",
    "PASDPipeline",
    "paca_contexts",
    "pasd_noise_pred",
    "pasd_scheduler",
]
