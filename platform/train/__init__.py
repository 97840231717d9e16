"""Training: stage configs and presets, the Ray Train worker loop and the job driver."""
