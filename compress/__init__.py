"""mixrank.compress: calibration statistics, factorization, rank allocation, refinements,
factors file.

Public API::

    factors = compress_model(model, batches, CompressConfig(keep=0.4))
    save_factors(factors, "model.mixrank.safetensors")
    small = apply_factors(model, load_factors("model.mixrank.safetensors"))

The stages are sub-packages in pipeline order, each importing only the ones before it:
`calibrate` (layers, batches, statistics), `store` (precision), `factor` (closed forms,
fits, layer forms, sparse terms, pairs), `artifact` (plan, factors file, factored model),
`score` (the output error), `allocate` (ranks and precisions under the budget), `refine`
(the guarded refinements); `compress_model` calls them in turn (docs/design.md,
"Architecture").

Extension points (docs/design.md, "Extension points"): `METHODS`, `FACTORIZERS`,
`ALLOCATORS`, `REFINEMENTS`, `SPARSE`, `FORMS`, `PAIRINGS`; each sub-package's
``__init__`` imports its built-in implementations (their registration).

Names are imported on first use (PEP 562), so that importing this package does not
import torch.
"""

from mixrank.core import lazy_exports

lazy_exports(globals(), {
    ".allocate": ("ALLOCATORS", "Allocation", "Allocator", "Candidate", "LatencyBudget", "LatencyTable",
                  "LayerSpace", "layer_spaces", "parse_latency", "uniform_allocation"),
    ".artifact": ("FORMAT_VERSION", "FactoredLinear", "Factors", "LayerPlan", "Plan", "apply_factors",
                  "check_pinned_digest", "load_factors", "save_factors", "validate_factors",
                  "weight_fingerprint"),
    ".calibrate": ("MAX_IMAGE_PIXELS", "Calibration", "ImageBatches", "LayerStats", "collect_stats",
                   "countable_params", "image_csv", "image_folder", "model_transform", "select_layers"),
    "._config": ("CompressConfig", "job_config", "merge_settings"),
    "._defaults": ("JOB_BYTES",),
    "._methods": ("METHODS", "Method"),
    "._pipeline": ("compress_model", "latency_layers", "model_fingerprint"),
    "._sections": ("Budget", "Quantize", "Refine", "Search", "Selection"),
    ".factor": ("FACTORIZERS", "FORMS", "PAIRINGS", "SPARSE", "EmitContext", "Factorizer", "LayerForm", "form_of",
                "SparseStructure", "SparseTerm", "Spectrum", "activation_error", "plain_spectrum",
                "whitened_spectrum"),
    ".refine": ("REFINEMENTS", "Refinement"),
    ".store": ("INT_BITS", "PRECISIONS", "QTensor", "read_back", "stored_qtensor"),
    "mixrank.core": ("FolderLock", "MixrankError", "WriteError", "atomic_write", "atomic_write_bytes",
                     "atomic_write_text", "check_writable_path", "close_matches", "import_onnxruntime",
                     "output_dir", "output_folder", "sha256_file"),
}, modules={"distributed": ".calibrate.distributed"})
