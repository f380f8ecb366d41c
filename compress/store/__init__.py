"""Storage precision: block-wise integer quantization (RTN, GPTQ) and the one place a
weight or a factor pair is stored at a precision and read back exactly as the engine
reads it (docs/design.md, "Precision")."""

from ._quant import (
    BLOCKS,
    FLOAT_BYTES,
    GRIDS,
    INT_BITS,
    PRECISIONS,
    SCALE_BYTES,
    SPLITS,
    QTensor,
    check_precision,
    dynamic_linear,
    fake_quant,
    per_channel_int8,
    per_channel_int8_of,
    quantize,
    rebalance,
    rebalanced_ste,
    ste,
    storage_bytes,
)
from ._storage import StoredFactors, qtensor_tensors, read_back, store_pair, store_weight, stored_qtensor
