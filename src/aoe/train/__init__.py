"""Training: run configs and presets, the loop, the optimizer and schedule, and checkpoints."""
