"""mixrank.compress: calibration statistics, factorization, rank allocation, factors file.

Public API::

    factors = compress_model(model, batches, CompressConfig(keep=0.4))
    save_factors(factors, "model.mixrank.safetensors")
    small = apply_factors(model, load_factors("model.mixrank.safetensors"))
"""

from ._calibrate import Calibration, LayerStats, collect_stats
from ._compress import compress_model, model_fingerprint
from ._config import FORMAT_VERSION, CompressConfig
from ._data import ImageBatches, image_csv, image_folder, model_transform
from ._errors import MixrankError, close_matches
from ._factor import Spectrum, activation_error, plain_spectrum, whitened_spectrum
from ._factored import FactoredLinear, apply_factors
from ._factors import Factors, load_factors, save_factors, weight_fingerprint
from ._select import select_layers

__all__ = [
    "FORMAT_VERSION", "Calibration", "CompressConfig", "FactoredLinear", "Factors",
    "ImageBatches", "LayerStats", "MixrankError", "Spectrum", "activation_error",
    "apply_factors", "close_matches", "collect_stats", "compress_model", "image_csv",
    "image_folder", "load_factors", "model_fingerprint", "model_transform", "plain_spectrum",
    "save_factors", "select_layers", "weight_fingerprint", "whitened_spectrum",
]
