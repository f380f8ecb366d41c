"""torch → ONNX export of the original model, checked and compared with PyTorch."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mixrank.compress import apply_factors
from mixrank.core import MixrankError, import_onnxruntime

from ._onnxio import check_and_save
from ._verify import Tolerance, compare_outputs, run_onnxruntime


def export_onnx(
    model: nn.Module,
    example,
    path: str | os.PathLike,
    opset: int = 17,
    dynamic_batch: bool = True,
    fp16: bool = False,
    check_inputs=None,
    tolerance: Tolerance | None = None,
    input_name: str = "input",
    output_name: str = "output",
    external_data: bool | None = None,
) -> dict:
    """Export ``model`` to ONNX, run ``onnx.checker`` (full check), and compare
    onnxruntime with PyTorch on ``check_inputs`` (default ``example``).

    Args:
        model: an image model taking one (B, C, H, W) tensor, or a text model taking
            named (B, T) integer tensors (``input_ids``, ``attention_mask``, ...).
        example: an example input: a tensor (its shape fixes the non-batch dimensions),
            or a dict of the named inputs in the order of the model's ``forward``
            (optimum's convention: each with a dynamic ``batch`` and ``sequence`` axis).
        path: the .onnx file to write (atomically; external data when over 2 GB).
        opset: ONNX opset (>= 17).
        dynamic_batch: make the batch dimension symbolic (and, for named inputs, the
            sequence dimension).
        fp16: export in float16 (for TensorRT 11's strongly typed networks): weights
            and activations are float16, float inputs and outputs too.
        check_inputs: inputs compared between PyTorch and onnxruntime (``None``: ``example``).
        tolerance: `Tolerance` of the comparison (defaults by precision).
        input_name, output_name: the graph's input name for a tensor ``example``
            (``input``), and its output name (``output``; e.g. ``embedding`` or ``logits``).
        external_data: force (or forbid) external data; ``None`` decides by size.

    Returns:
        The comparison report (max abs/rel error and cosine per output).

    Raises:
        MixrankError: an opset outside 17 to the exporter's newest (20 with PyTorch's
            TorchScript exporter); PyTorch cannot export the model; onnxruntime disagrees
            with PyTorch beyond tolerance.
    """
    import onnx

    check_opset(opset)
    path = Path(path)
    model = model.eval()
    dtype = torch.float16 if fp16 else torch.float32
    device = next(model.parameters()).device
    export_model = model if not fp16 else _half_copy(model)
    example = _named(example, input_name, device, dtype)
    names = list(example)
    axes = {n: ({0: "batch", 1: "sequence"} if example[n].ndim == 2 and not example[n].is_floating_point()
                else {0: "batch"}) for n in names}
    with tempfile.TemporaryDirectory(prefix="mixrank-export-") as tmpdir:
        tmp = Path(tmpdir) / "export.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    export_model, tuple(example.values()), str(tmp), dynamo=False, opset_version=opset,
                    input_names=names, output_names=[output_name], do_constant_folding=True,
                    dynamic_axes={**axes, output_name: {0: "batch"}} if dynamic_batch else None,
                )
            except (RuntimeError, TypeError, ValueError, torch.onnx.errors.OnnxExporterError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise MixrankError(f"PyTorch cannot export this model to ONNX opset {opset}: {first}") from None
        proto = onnx.load(str(tmp))
    proto.producer_name = "mixrank"
    check_and_save(proto, path, external_data)
    x = _named(check_inputs if check_inputs is not None else example, input_name, device, dtype)
    with torch.no_grad():
        ref = export_model(**x).float().cpu().numpy() if len(x) > 1 else \
            export_model(*x.values()).float().cpu().numpy()
    try:
        got = run_onnxruntime(path, {n: t.cpu().numpy() for n, t in x.items()})[0]
    except Exception as e:
        path.unlink(missing_ok=True)
        raise MixrankError(f"onnxruntime cannot run the exported model: {e}") from None
    tol = tolerance or (Tolerance.fp16() if fp16 else Tolerance.fp32())
    report = compare_outputs({output_name: ref}, {output_name: np.asarray(got, np.float32)}, tol)
    if not report["ok"]:
        path.unlink(missing_ok=True)
        raise MixrankError(f"the exported ONNX model disagrees with PyTorch: {report['message']}")
    return report


def check_opset(opset, flag: str = "opset") -> None:
    """Refuse an opset `export_onnx` cannot write: not an integer, older than 17, or newer
    than PyTorch's TorchScript exporter writes (20 in PyTorch 2.x).

    Raises:
        MixrankError: names the opset and the range.
    """
    try:
        from torch.onnx import _constants

        newest = int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):
        newest = 20
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise MixrankError(f"{flag} must be an integer, got {opset!r}")
    if not 17 <= opset <= newest:
        raise MixrankError(f"{flag} {opset} is not supported: the exporter writes opsets 17 to {newest}")


def _named(x, input_name: str, device, dtype) -> dict[str, torch.Tensor]:
    """The example as named inputs: a tensor becomes ``{input_name: x}``; float tensors
    take ``dtype``, integer ones (token ids, masks) stay integers."""
    named = dict(x) if isinstance(x, dict) else {input_name: x}
    return {n: t.to(device, dtype) if t.is_floating_point() else t.to(device) for n, t in named.items()}


def _half_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).half()


DYNAMIC_AGREEING = 0.75  # the share of samples a dynamic int8 artifact matches its simulation on
DYNAMIC_MIN_COSINE = 0.999  # and the least cosine of any sample


def _verify_dynamic(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> dict:
    n = len(ref)
    r, g = ref.reshape(n, -1).astype(np.float64), got.reshape(n, -1).astype(np.float64)
    scale = np.abs(r).max()
    agree = (np.abs(g - r) <= tol.atol + tol.rtol * scale).all(axis=1)
    cos = (r * g).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1) + 1e-30)
    report = {"ok": bool(agree.mean() >= DYNAMIC_AGREEING and cos.min() >= DYNAMIC_MIN_COSINE),
              "outputs": {name: {"samples": n, "samples_agreeing": int(agree.sum()), "least_cosine": float(cos.min()),
                                 "max_rel": float(np.abs(g - r).max() / max(scale, 1e-30))}},
              "tolerance": {**tol.__dict__, "samples_agreeing": DYNAMIC_AGREEING, "min_cosine": DYNAMIC_MIN_COSINE}}
    if not report["ok"]:
        raise MixrankError(f"the rewritten model disagrees with its dynamic int8 simulation: {int(agree.sum())} of {n} "
                           f"samples within tolerance (at least {DYNAMIC_AGREEING:.0%} needed), least cosine "
                           f"{cos.min():.6f}")
    return report


def verify_rewrite(onnx_path, model, factors, inputs, tolerance: Tolerance | None = None,
                   input_name: str | None = None, int_weights: str = "exact") -> dict:
    """Run the rewritten ONNX model ``onnx_path`` on onnxruntime and compare it with the
    factored PyTorch model (``apply_factors(model, factors)``) on real ``inputs``: a
    tensor of the first input, or a dict of named inputs (a text model's ``input_ids``,
    ``attention_mask``, ...).

    Args:
        tolerance: the `Tolerance` (``None``: fp32's, or fp16's for an fp16 graph).
        input_name: the graph input a tensor is fed to (``None``: its first).
        int_weights: ``"dynamic"`` for an artifact rewritten with dynamic int8 weights:
            the PyTorch side then simulates them (`apply_factors`' ``int_weights``). The
            simulation rounds an activation that lies within float rounding of a half step
            the other way now and then, and that sample's output then moves by up to a few
            percent: the check is per sample, at least `DYNAMIC_AGREEING` of them within
            ``tolerance`` and every one at a cosine of at least `DYNAMIC_MIN_COSINE`.

    Returns:
        `compare_outputs`' report.

    Raises:
        MixrankError: the outputs disagree beyond ``tolerance`` (the message names the
            worst element).
    """
    ort = import_onnxruntime()
    small = apply_factors(model, factors, int_weights=int_weights).eval()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    fp16 = "float16" in inp.type or "float16" in sess.get_outputs()[0].type
    wdtype = next(small.parameters()).dtype
    with torch.no_grad():
        if isinstance(inputs, dict):
            ref = small(**inputs).float().cpu().numpy()
            feeds = {n: t.cpu().numpy() for n, t in inputs.items()}
        else:
            x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(inputs)
            ref = small(x.to(wdtype)).float().cpu().numpy()
            feeds = {input_name or inp.name: x.cpu().numpy().astype(np.float16 if fp16 else np.float32)}
    got = sess.run(None, feeds)[0]
    tol = tolerance or (Tolerance.fp16() if fp16 else Tolerance.fp32())
    name = sess.get_outputs()[0].name
    if int_weights == "dynamic":
        return _verify_dynamic(name, ref, np.asarray(got, np.float32), tol)
    report = compare_outputs({name: ref}, {name: np.asarray(got, np.float32)}, tol)
    if not report["ok"]:
        raise MixrankError(f"the rewritten model disagrees with the factored PyTorch model: "
                           f"{report['message']}")
    return report
