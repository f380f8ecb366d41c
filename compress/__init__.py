"""mixrank.compress: calibration statistics, factorization, rank allocation, factors file.

Public API::

    factors = compress_model(model, batches, CompressConfig(keep=0.4))
    save_factors(factors, "model.mixrank.safetensors")
    small = apply_factors(model, load_factors("model.mixrank.safetensors"))

Extension points (docs/design.md, "Extension points"): `METHODS`, `FACTORIZERS`,
`ALLOCATORS`, `REFINEMENTS`, `SPARSE`; each interface module imports its built-in
implementations at its end (their registration).

Names are imported on first use (PEP 562), so that ``from mixrank.compress import
MixrankError`` or the file-writing helpers do not import torch: an engine process
that only needs those stays small (the peak-memory probe relies on it).
"""

from ._lazy import lazy_exports

lazy_exports(globals(), {
    "._allocate": ("ALLOCATORS", "Allocator"),
    "._calibrate": ("Calibration", "LayerStats", "collect_stats"),
    "._compress": ("compress_model", "model_fingerprint"),
    "._config": ("Budget", "CompressConfig", "Refine", "Search", "Selection"),
    "._data": ("ImageBatches", "image_csv", "image_folder", "model_transform"),
    "._errors": ("MixrankError", "WriteError", "close_matches", "import_onnxruntime"),
    "._factor": ("Spectrum", "activation_error", "plain_spectrum", "whitened_spectrum"),
    "._factored": ("FactoredLinear", "apply_factors"),
    "._factorizers": ("FACTORIZERS", "Factorizer"),
    "._factors": ("FORMAT_VERSION", "Factors", "load_factors", "save_factors", "weight_fingerprint"),
    "._io": ("FolderLock", "atomic_write", "atomic_write_bytes", "atomic_write_text", "check_writable_path",
             "output_dir", "output_folder", "sha256_file"),
    "._methods": ("METHODS", "Method"),
    "._plan": ("LayerPlan", "Plan"),
    "._refine": ("REFINEMENTS", "Refinement"),
    "._select": ("select_layers",),
    "._sparse": ("SPARSE", "SparseStructure", "SparseTerm"),
})
