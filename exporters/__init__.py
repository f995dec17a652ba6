"""ONNX export of hyperquant checkpoints (imported as hyperquant.exporters)."""
