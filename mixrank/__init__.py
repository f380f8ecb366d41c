"""mixrank: activation-aware mixed-rank compression of Vision Transformers, exported to
ONNX and TensorRT.

The stages are packages that import only downwards::

    mixrank.compress  <  mixrank.exporter  <  mixrank.engines  <  mixrank (CLI, pipeline, models)

Importing ``mixrank`` imports none of them (engine processes stay small); see
docs/design.md.
"""


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("mixrank")
        except PackageNotFoundError:  # pragma: no cover - a source tree without install
            return "0+unknown"
    raise AttributeError(f"module 'mixrank' has no attribute {name!r}")
