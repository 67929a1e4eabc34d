from .pipeline_pasd import (
    PASD_ADDED_PROMPT,
    PASD_NEGATIVE_PROMPT,
    PASD_PROCESS_SIZE,
    PASDPipeline,
    paca_contexts,
    pasd_noise_pred,
    pasd_original_prompt,
    pasd_process_steps,
    pasd_scheduler,
)

__all__ = [
    "PASD_ADDED_PROMPT",
    "PASD_NEGATIVE_PROMPT",
    "PASD_PROCESS_SIZE",
    "PASDPipeline",
    "paca_contexts",
    "pasd_noise_pred",
    "pasd_original_prompt",
    "pasd_process_steps",
    "pasd_scheduler",
]
