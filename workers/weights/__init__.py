"""Weights: architecture description, checkpoint reading (safetensors, dummy), model preparation."""
