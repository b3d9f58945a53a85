"""Quantization and the artifact: GPTQ with SDClip, LQER, the versioned container, size accounting and packing.

- :mod:`pgolf.quant.gptq`: SDClip scales, round-to-nearest, full-Hessian GPTQ, the Hessian-weighted error.
- :mod:`pgolf.quant.calibrate`: Hessians from forward hooks over training batches (looping on).
- :mod:`pgolf.quant.lqer`: the low-rank correction of the largest errors (R6).
- :mod:`pgolf.quant.quantize`: the per-tensor recipe (:class:`QuantSettings`, :func:`quantize_state`).
- :mod:`pgolf.quant.artifact`: the file format, loading checks, dequantization and the rebuilt model.
- :mod:`pgolf.quant.size`: the size table, the 16,000,000-byte budget check.
- :mod:`pgolf.quant.bundle` / :mod:`pgolf.quant.pack`: the self-contained ``train_gpt.py`` and ``pgolf-pack``.
"""

from pgolf.quant.artifact import (ArtifactError, QuantizedModel, QTensor, build_model, dequantize_state,
                                  load_artifact, save_artifact)
from pgolf.quant.gptq import gptq_quantize, hessian_error, quantize_rtn, sdclip_scales
from pgolf.quant.quantize import QuantSettings, quantize_state
from pgolf.quant.size import BUDGET_BYTES, OverBudgetError, artifact_size_table, check_budget, int8_brotli_bytes

__all__ = ["ArtifactError", "QuantizedModel", "QTensor", "build_model", "dequantize_state", "load_artifact",
           "save_artifact", "gptq_quantize", "hessian_error", "quantize_rtn", "sdclip_scales", "QuantSettings",
           "quantize_state", "BUDGET_BYTES", "OverBudgetError", "artifact_size_table", "check_budget",
           "int8_brotli_bytes"]
