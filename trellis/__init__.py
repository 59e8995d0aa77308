"""Trellis: prefix-cached (RadixAttention) LLM inference for PyTorch on the hardware you own."""
