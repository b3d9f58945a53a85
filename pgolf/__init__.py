"""pgolf: fused Triton kernels, a lean record-stack GPT and its training/eval pipeline for Parameter Golf."""

__version__ = "0.1.0"
