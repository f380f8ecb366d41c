"""The one check of a factors file against its own plan, run when the file loads.

A file whose digest matches can still be wrong: written by a buggy or foreign tool, or
forged with its digest recomputed (the digest is an unkeyed SHA-256: it detects damage,
not forgery). Everything that reads factors (the factored model, the rewriter, inspect,
eval) trusts what `validate_factors` has checked: every layer's plan fields have their
types and ranges, every tensor the layer's form reads is there with the shape and dtype
the plan implies, indices are in range and distinct, and every stored value is finite.
"""

from __future__ import annotations

import torch

from mixrank.core import MixrankError

from ..factor import FORMS, SPARSE
from ..store import BLOCKS, PRECISIONS, read_back

INTS = tuple(p for p in PRECISIONS if p.startswith("int"))


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Bad(Exception):
    def __init__(self, field: str, what: str):
        super().__init__(field, what)
        self.field, self.what = field, what


def validate_factors(factors, where: str) -> None:
    """Check ``factors`` (a `Factors`) against its plan.

    Raises:
        MixrankError: one line naming ``where``, the layer and the field that is wrong.
    """
    layers = factors.plan.get("layers")
    if not isinstance(layers, dict):
        raise MixrankError(f"{where}: the plan's layers are {type(layers).__name__}, not a table of name = layer")
    for t_name, t in factors.tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise MixrankError(f"{where}: tensor {t_name} holds {bad:,} values that are NaN or infinite")
    for name, info in layers.items():
        try:
            _check_layer(factors.tensors, name, info)
        except _Bad as e:
            raise MixrankError(f"{where}: layer {name}: {e.field} {e.what}") from None


def _check_layer(tensors: dict, name: str, info) -> None:
    if not isinstance(info, dict):
        raise _Bad("entry", f"is {type(info).__name__}, not a table")
    shape = info.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_int(d) and d > 0 for d in shape)):
        raise _Bad("shape", f"is {shape!r}, not [out, in] of positive integers")
    m, n = shape
    if not isinstance(info.get("dense"), bool):
        raise _Bad("dense", f"is {info.get('dense')!r}, not true or false")
    precision = info.get("precision")
    if precision not in PRECISIONS:
        raise _Bad("precision", f"is {precision!r}; a factors file stores {', '.join(PRECISIONS)}")
    block = info.get("block", 0)
    if not (_int(block) and (block == 0 or block in BLOCKS)):
        raise _Bad("block", f"is {block!r}, not 0 or one of {', '.join(map(str, BLOCKS))}")
    form_name = info.get("form") or "lowrank"
    if not isinstance(form_name, str) or form_name not in FORMS:
        raise _Bad("form", f"is {form_name!r}; the forms are {', '.join(FORMS.names())}")
    sparse = info.get("sparse") or {}
    structure = sparse.get("structure", "none") if isinstance(sparse, dict) else sparse
    if structure != "none" and structure not in SPARSE:
        raise _Bad("sparse structure", f"is {structure!r}; the structures are none, {', '.join(SPARSE.names())}")
    if info["dense"]:
        if precision != "fp32":
            _shaped(lambda: read_back(tensors, f"{name}.W", n, precision), (m, n), "W", precision, tensors, name)
        return
    rank = info.get("rank")
    if not (_int(rank) and rank > 0):
        raise _Bad("rank", f"is {rank!r}, not a positive integer")
    form = FORMS[form_name]
    if form_name == "residual" and info.get("residual_precision") not in INTS:
        raise _Bad("residual_precision", f"is {info.get('residual_precision')!r}, not one of {', '.join(INTS)}")
    if form.paired:
        _check_index(tensors, name, rank, m if form_name == "rows" else n)
    try:
        A, B = form.read(tensors, name, info)
        residual = form.read_residual(tensors, name, info)
    except KeyError as e:
        raise _Bad("tensor", f"{e.args[0]} is missing (the plan says {form_name} at {precision})") from None
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise _Bad("tensors", f"do not hold {form_name} at {precision} ({str(e).splitlines()[0][:120]})") from None
    if tuple(A.shape) != (m, rank) or tuple(B.shape) != (rank, n):
        raise _Bad("rank", f"is {rank} over factors of shapes {list(A.shape)} and {list(B.shape)} (expected "
                           f"[{m}, {rank}] and [{rank}, {n}])")
    if residual is not None and tuple(residual.shape) != (m, n):
        raise _Bad("W", f"has shape {list(residual.shape)}, not [{m}, {n}]")
    _check_dtypes(tensors, name, precision if form_name != "residual" else None)
    if structure != "none":
        idx = tensors.get(f"{name}.sparse_index")
        val = tensors.get(f"{name}.sparse_value")
        if idx is None or val is None:
            raise _Bad("sparse", f"{structure} needs {name}.sparse_index and {name}.sparse_value")
        if idx.is_floating_point() or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n)):
            raise _Bad("sparse_index", f"must hold integer input columns in [0, {n})")


def _shaped(read, want: tuple, role: str, precision: str, tensors: dict, name: str) -> None:
    try:
        w = read()
    except KeyError as e:
        raise _Bad("tensor", f"{e.args[0]} is missing (the plan says dense at {precision})") from None
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise _Bad("tensors", f"do not hold a dense weight at {precision} ({str(e).splitlines()[0][:120]})") from None
    if tuple(w.shape) != want:
        raise _Bad(role, f"has shape {list(w.shape)}, not {list(want)}")
    _check_dtypes(tensors, name, precision)


def _check_dtypes(tensors: dict, name: str, precision: str | None) -> None:
    """Integer codes are uint8, scales floating; float factors at fp32/fp16 are floating
    (``precision`` ``None``: a mix, checked per kind of tensor only)."""
    for key, t in tensors.items():
        if not key.startswith(name + "."):
            continue
        tail = key[len(name) + 1:]
        if tail.endswith((".codes", ".zero_point")) and t.dtype != torch.uint8:
            raise _Bad(tail, f"is {t.dtype}, not torch.uint8 codes")
        if tail.endswith(".scale") and not t.is_floating_point():
            raise _Bad(tail, f"is {t.dtype}, not floating-point scales")
        if tail in ("A", "B", "W") and not t.is_floating_point():
            raise _Bad(tail, f"is {t.dtype}; at {precision or 'a float precision'} it must be floating point")


def _check_index(tensors: dict, name: str, rank: int, size: int) -> None:
    idx = tensors.get(f"{name}.index")
    if idx is None:
        raise _Bad("tensor", f"{name}.index is missing (a pair's layer keeps its index)")
    if idx.is_floating_point() or idx.dim() != 1 or idx.numel() != rank:
        raise _Bad("index", f"must be {rank} integers (the rank), got {idx.dtype} of shape {list(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise _Bad("index", f"holds {int(idx.min())}..{int(idx.max())}, outside [0, {size})")
    if torch.unique(idx).numel() != idx.numel():
        raise _Bad("index", "repeats an entry (each kept row or column once)")
