"""Static check of an ONNX graph against what TensorRT's ONNX parser accepts.

The table reflects the ONNX-TensorRT operator support matrix of TensorRT 10.x
(opsets 9 to 20): operators listed "Y" there, with the restrictions that matter for
transformer graphs. Anything not in the table is reported, not guessed.
"""

from __future__ import annotations

import os

TRT_VERSION = "10.x (ONNX-TensorRT operator support matrix, opsets 9-20)"
MIN_OPSET, MAX_OPSET = 9, 20

SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose
Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout DynamicQuantizeLinear
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu
Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh
Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze STFT Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Attribute restrictions of the parser that a rewritten ViT graph can run into.
TYPES_OK = {"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "INT8", "UINT8", "BOOL", "DOUBLE"}


def check_tensorrt_compat(model_or_path) -> dict:
    """Every node's operator (default domain), the opset, and tensor types against
    `SUPPORTED_OPS`. Returns ``{"ok", "tensorrt", "opset", "problems": [...]}``."""
    import onnx

    model = onnx.load(str(model_or_path), load_external_data=False) \
        if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        problems.append({"what": "opset", "detail": f"opset {opset} outside {MIN_OPSET}-{MAX_OPSET}"})
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append({"node": node.name, "op": node.op_type,
                             "detail": f"custom domain {node.domain!r} needs a TensorRT plugin"})
        elif node.op_type not in SUPPORTED_OPS:
            problems.append({"node": node.name, "op": node.op_type,
                             "detail": "operator not supported by TensorRT's ONNX parser"})
    for t in model.graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        if name not in TYPES_OK:
            problems.append({"tensor": t.name, "detail": f"data type {name} not supported"})
    return {"ok": not problems, "tensorrt": TRT_VERSION, "opset": opset, "problems": problems}
