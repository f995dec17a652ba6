"""ONNX export of hyperquant models (imported as hyperquant.exporters).

PHM layers export as one node each in the ``hyperquant`` op domain (``PHMLinear``, ``PHMMatMulNBits``),
defined as model-local ONNX functions over standard ops and com.microsoft.MatMulNBits, so a plain
onnxruntime InferenceSession runs them. Dense hyperquant layers export as MatMulNBits.

    from hyperquant.exporters import export_checkpoint, generate
    export_checkpoint("out/smollm-phm", "onnx/model.onnx")
    print(generate("onnx/model.onnx", tokenizer, "The capital of France is", max_new_tokens=16))
"""

from hyperquant.exporters.export import (
    DEFAULT_OPSET,
    REPORT_NAME,
    CausalLMWrapper,
    check_parity,
    export_checkpoint,
    export_command,
    export_dense,
    export_model,
    export_ort_rtn,
    parity_tolerance,
)
from hyperquant.exporters.ops import DOMAIN, attach_functions, translation_table
from hyperquant.exporters.runtime import OnnxCausalLM, generate, generate_ids, make_session

from hyperquant.kinds import ORT_SUPPORTED_BITS

__all__ = [
    "DEFAULT_OPSET",
    "DOMAIN",
    "ORT_SUPPORTED_BITS",
    "REPORT_NAME",
    "CausalLMWrapper",
    "OnnxCausalLM",
    "attach_functions",
    "check_parity",
    "export_checkpoint",
    "export_command",
    "export_dense",
    "export_model",
    "export_ort_rtn",
    "generate",
    "generate_ids",
    "make_session",
    "parity_tolerance",
    "translation_table",
]
