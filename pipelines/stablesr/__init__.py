from .pipeline_stablesr import StableSRPipeline, space_timesteps, stablesr_noise_pred, stablesr_scheduler

__all__ = ["StableSRPipeline", "space_timesteps", "stablesr_noise_pred", "stablesr_scheduler"]
