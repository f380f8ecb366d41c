"""Engines (`RUNNERS`): the `Runner` interface and its built-in implementations,
``onnxruntime`` (imported here) and ``tensorrt`` (a lazy entry, like the TensorRT names
below: its module is imported where a TensorRT engine is built or loaded). Adding one:
docs/design.md, "Adding an engine"."""

from mixrank.core import lazy_exports

from ._base import RUNNERS, SEQ_LEN, Runner, TensorSpec, check_inputs, make_runner, random_feeds, run_all
from ._ort import PROVIDERS, OrtRunner, OrtSettings, available_providers, build_ort, ort_session

RUNNERS.add_lazy("tensorrt", "._tensorrt:TrtRunner", __name__)
lazy_exports(globals(), {"._tensorrt": ("TrtRunner", "TrtSettings", "build_engine", "check_two_gemms",
                                        "import_tensorrt")})
