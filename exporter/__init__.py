"""mixrank.exporter: torch → ONNX export, the ONNX graph rewriter, verification, the CLI."""
