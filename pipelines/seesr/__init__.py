from .pipeline_seesr import (
    SEESR_PROCESS_SIZE,
    SeeSRPipeline,
    seesr_original_prompt,
    seesr_process_steps,
    seesr_scheduler,
)

__all__ = ["SEESR_PROCESS_SIZE", "SeeSRPipeline", "seesr_original_prompt", "seesr_process_steps", "seesr_scheduler"]
