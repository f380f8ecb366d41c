"""Calibration: which layers, the data that runs through them, and the statistics it leaves.

- `select_layers` (and `block_sequence`): the Linear layers to compress, and the repeated
  blocks that hold them;
- batches: tensors, tuples or dicts, and the model calls that work on all three;
- `collect_stats`: each layer's input Gram matrix, streamed in float64 (spilled to disk
  beyond a memory budget);
- `image_folder`, `image_csv`: images preprocessed with the model's own transform;
- `distributed`: data parallelism over ``torch.distributed`` (every helper is the identity on
  one process).
"""

from . import distributed
from ._batches import (
    Batch,
    batch_size,
    first_tensor,
    limit_samples,
    mask_tokens,
    model_output,
    move_batch,
    run_model,
    slice_batch,
    split_holdout,
)
from ._images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    ImageBatches,
    image_csv,
    image_folder,
    list_images,
    model_transform,
)
from ._select import DEFAULT_EXCLUDE, block_sequence, countable_params, linear_layers, select_layers
from ._stats import Calibration, GramView, LayerStats, collect_stats, gram_bytes, spill_plan
