"""Training: one loop for both stages on a DeepSpeed engine (GPUs, or a CPU over gloo)."""
