"""ONNX export of hyperquant models (imported as hyperquant.exporters).

Two forms: ``export_genai_folder`` / ``export_checkpoint_folder`` write an onnxruntime-genai folder with
the fused graph (GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits; Llama family), and
``export_model`` / ``export_checkpoint`` write one traced .onnx file for any architecture.

PHM layers export as one node each in the ``hyperquant`` op domain (``PHMLinear``, ``PHMMatMulNBits``),
defined as model-local ONNX functions over standard ops and com.microsoft.MatMulNBits, so a plain
onnxruntime InferenceSession runs them. Dense hyperquant layers export as MatMulNBits.

    from hyperquant.exporters import export_checkpoint, generate
    export_checkpoint("out/smollm-phm", "onnx/model.onnx")
    print(generate("onnx/model.onnx", tokenizer, "The capital of France is", max_new_tokens=16))
"""

from hyperquant.exporters.export import (
    DEFAULT_OPSET,
    CausalLMWrapper,
    check_parity,
    export_checkpoint,
    export_command,
    export_dense,
    export_model,
    export_ort_rtn,
    parity_tolerance,
    report_path,
)
from hyperquant.exporters.fused import FUSED_MODEL_TYPES, build_fused_graph, fused_reason
from hyperquant.exporters.genai import (
    export_checkpoint_folder,
    export_folder_command,
    export_genai_folder,
    genai_available,
)
from hyperquant.exporters.ops import DOMAIN, attach_functions, translation_table
from hyperquant.exporters.runtime import (
    OnnxCausalLM,
    genai_generate_ids,
    generate,
    generate_ids,
    make_session,
)

from hyperquant.kinds import ORT_SUPPORTED_BITS

__all__ = [
    "DEFAULT_OPSET",
    "DOMAIN",
    "FUSED_MODEL_TYPES",
    "ORT_SUPPORTED_BITS",
    "CausalLMWrapper",
    "OnnxCausalLM",
    "attach_functions",
    "build_fused_graph",
    "check_parity",
    "export_checkpoint",
    "export_checkpoint_folder",
    "export_command",
    "export_dense",
    "export_folder_command",
    "export_genai_folder",
    "export_model",
    "export_ort_rtn",
    "fused_reason",
    "genai_available",
    "genai_generate_ids",
    "generate",
    "generate_ids",
    "make_session",
    "parity_tolerance",
    "report_path",
    "translation_table",
]
