"""Analysis of outputs and features: metrics, active latents, scale, calibration, scores."""
