"""The graph rewriter: dense constant-weight MatMul/Gemm → low-rank-plus-sparse subgraph.

    Y = MatMul(MatMul(X, Bᵀ), Aᵀ)  [+ sparse path]  [+ bias]

and for the layers of a pair (mixrank.compress.factor.pairs): ``rows`` ``Y = Mul(Gather(MatMul(X,
Bᵀ), inv), mask)`` (r outputs computed, put in place, the rest zero), ``cols`` ``Y =
MatMul(Gather(X, index), Aᵀ)`` (r inputs read), each ``+ bias delta`` where the pair changed
the bias.

The factors are never multiplied together and nothing is constant-folded, so the
graph keeps the two thin GEMMs of inner size r (docs/design.md, "The graph rewrite").
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixrank.compress import SPARSE, EmitContext, Factors, form_of, load_factors
from mixrank.core import MixrankError

from ._onnxio import check_and_save, check_onnx_output, load_onnx
from ._qlinear import INT_WEIGHTS, MS_DOMAIN, TARGETS, project


@dataclass
class WeightSite:
    """A MatMul/Gemm whose weight is a constant, seen as ``Y = X Wᵀ (+ bias)``."""

    node: object  # gs.Node
    x: object  # gs.Tensor feeding the activation side
    weight: np.ndarray  # (m, n) = (out, in), in the graph's dtype
    weight_name: str  # initializer / constant name (after any Transpose)
    trans_a: bool = False
    bias: np.ndarray | None = None  # Gemm C times beta, (m,) or broadcastable


@dataclass
class RewriteReport:
    """What the rewrite did: per rewritten layer and per constant-weight MatMul left dense."""

    rewritten: list[dict] = field(default_factory=list)
    dense: list[dict] = field(default_factory=list)
    unmatched_factors: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    output: str = ""
    mismatched: list[str] = field(default_factory=list)  # matched by name, weight differs
    allowed_mismatch: bool = False
    weights: str = "packed"  # how onnxruntime holds the integer weights (INT_WEIGHTS)

    def to_dict(self) -> dict:
        """The report as a plain dict (rewrite.json)."""
        return {"rewritten": self.rewritten, "dense": self.dense,
                "unmatched_factors": self.unmatched_factors,
                "params_before": self.params_before, "params_after": self.params_after,
                "output": self.output, "mismatched": self.mismatched,
                "allowed_mismatch": self.allowed_mismatch, "weights": self.weights}


def _const_values(t) -> tuple[np.ndarray, str] | None:
    """Values and name of a constant tensor (initializer or Constant node), else None."""
    import onnx_graphsurgeon as gs

    if isinstance(t, gs.Constant):
        return np.asarray(t.values), t.name
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values), v.name or t.name
    return None


def _weight_of(t) -> tuple[np.ndarray, str] | None:
    """A constant 2-D weight, possibly behind a Transpose (perm [1, 0])."""
    c = _const_values(t)
    if c is not None:
        return c if c[0].ndim == 2 else None
    if len(t.inputs) == 1 and t.inputs[0].op == "Transpose":
        tr = t.inputs[0]
        perm = list(tr.attrs.get("perm", [1, 0]))
        c = _const_values(tr.inputs[0])
        if c is not None and c[0].ndim == 2 and perm == [1, 0]:
            return c[0].T, c[1]
    return None


def find_weight_sites(graph) -> tuple[list[WeightSite], list[dict]]:
    """Every MatMul/Gemm with a constant weight, and those that cannot be rewritten
    (with the reason)."""
    sites, skipped = [], []
    for node in graph.nodes:
        if node.op == "MatMul" and len(node.inputs) == 2:
            w = _weight_of(node.inputs[1])
            if w is None:
                if _weight_of(node.inputs[0]) is not None:
                    skipped.append({"node": node.name, "reason": "constant is the left operand"})
                continue
            sites.append(WeightSite(node, node.inputs[0], np.ascontiguousarray(w[0].T), w[1]))
        elif node.op == "Gemm":
            w = _weight_of(node.inputs[1])
            if w is None:
                if _weight_of(node.inputs[0]) is not None:
                    skipped.append({"node": node.name, "reason": "constant is the A operand"})
                continue
            values, name = w
            W = values if node.attrs.get("transB", 0) else values.T  # (m, n)
            alpha = float(node.attrs.get("alpha", 1.0))
            if alpha != 1.0:  # the layer's weight is the effective alpha·B
                W = (W.astype(np.float32) * np.float32(alpha)).astype(W.dtype)
            bias = None
            if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
                c = _const_values(node.inputs[2])
                if c is None:
                    skipped.append({"node": node.name, "reason": "Gemm C is not a constant"})
                    continue
                bias = c[0] * float(node.attrs.get("beta", 1.0))
            sites.append(WeightSite(node, node.inputs[0], np.ascontiguousarray(W), name,
                                    trans_a=bool(node.attrs.get("transA", 0)), bias=bias))
    return sites, skipped


def _fp(w: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest()


def match_sites(sites: list[WeightSite], factors: Factors,
                allow_mismatch: bool = False) -> tuple[list, list[dict], list[str]]:
    """Map each site to a factored layer: by initializer name (``<layer>.weight``), else
    by weight fingerprint in either orientation (fp32, or fp16-rounded for fp16
    graphs). A name match is only trusted when the weight's fingerprint is the one the
    factors were computed from: another model that names its weights the same way
    (a fine-tuned sibling) must not get these factors.

    Returns:
        (matched ``(site, layer, how)``, sites left dense with the reason, layers matched
        by name whose weight differs — only with ``allow_mismatch``).

    Raises:
        MixrankError: a node matches two layers, a name matches with another shape, or a
            name matches a different weight (without ``allow_mismatch``; the layers are
            named).
    """
    layers = {n: i for n, i in factors.layers.items() if n in set(stored_layers(factors))}
    by_fp: dict[str, list[tuple[str, bool]]] = {}
    for name, info in layers.items():
        for fp in (info.sha256, info.sha256_fp16):
            if fp:
                by_fp.setdefault(fp, []).append((name, False))
    matched, dense, mismatched = [], [], []
    for s in sites:
        m, n = s.weight.shape
        base = s.weight_name[:-len(".weight")] if s.weight_name.endswith(".weight") else None
        if base in layers:
            info = layers[base]
            if list(info.shape) != [m, n]:
                raise MixrankError(
                    f"node {s.node.name!r}: initializer {s.weight_name!r} has shape {[m, n]} (out, in) "
                    f"but the factors of {base!r} are for {info.shape}")
            known = {fp for fp in (info.sha256, info.sha256_fp16) if fp}
            if known and _fp(s.weight) not in known:
                mismatched.append(base)
                if not allow_mismatch:
                    continue
                matched.append((s, base, "name (weight differs, allowed)"))
                continue
            matched.append((s, base, "name"))
            continue
        hits = {name for name, _ in by_fp.get(_fp(s.weight), [])}
        how = "fingerprint"
        if not hits:  # the other orientation: the node computes X W, not X Wᵀ
            flipped = {name for name, _ in by_fp.get(_fp(s.weight.T), [])}
            if flipped:
                dense.append({"node": s.node.name, "weight": s.weight_name, "shape": [m, n],
                              "reason": f"its weight is {sorted(flipped)[0]}'s transposed: the node "
                                        "computes x W, not the layer's x Wᵀ"})
                continue
        if len(hits) > 1:
            raise MixrankError(
                f"node {s.node.name!r} matches several factored layers ({', '.join(sorted(hits))}): "
                "their weights are identical; rewrite by name instead")
        if hits:
            matched.append((s, hits.pop(), how))
        else:
            dense.append({"node": s.node.name, "weight": s.weight_name, "shape": [m, n],
                          "reason": "no factors for this weight (not selected, kept dense, or "
                                    "another model's weight)"})
    if mismatched and not allow_mismatch:
        more = f" (and {len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        raise MixrankError(
            f"the weight of {', '.join(mismatched[:5])}{more} differs from the one the factors were computed "
            "from: these factors belong to another model (pass --allow-mismatch to apply them anyway)")
    return matched, dense, mismatched


def _replace(graph, site: WeightSite, layer: str, factors: Factors, tag: str, target: str,
             shared: bool = False, weights: str = "packed") -> int:
    """Splice the layer's stored form in place of ``site.node``: its form's subgraph
    (`LayerForm.emit_onnx`) plus the bias delta, the sparse path and the bias, or one
    projection of a dense layer stored below fp32. Returns the number of weight values
    (parameters) the new constants hold."""
    import onnx_graphsurgeon as gs

    node = site.node
    dtype = site.weight.dtype if site.weight.dtype in (np.float16, np.float32, np.float64) \
        else np.float32
    info = factors.layers[layer]
    m, n = info.shape
    y = node.outputs[0]
    base = f"{node.name or layer}/mixrank{tag}"  # unique even for unnamed or shared nodes
    x, new_nodes = site.x, []
    if site.trans_a:  # Gemm transA: X is stored (n, N)
        xt = gs.Variable(f"{base}/x_t", dtype=x.dtype)
        new_nodes.append(gs.Node("Transpose", f"{base}/transpose_x", {"perm": [1, 0]}, [x], [xt]))
        x = xt

    def const(what: str) -> str:
        return f"{layer}.{what}/{tag}"

    if info.dense:  # a dense layer stored at a reduced precision: one projection, named as before
        low = gs.Variable(f"{base}/low_rank", dtype=y.dtype)
        suffix = f"_{tag}" if shared else ""
        new_nodes += project(x, factors.tensors, f"{layer}.W", n, m, info.precision, dtype,
                             (node.name or base) + suffix, lambda what: f"{site.weight_name}_{what}{suffix}",
                             low, target, weights)
        values = m * n
    else:
        def proj(inp, role: str, k: int, n_out: int, name: str, out, precision: str | None = None):
            return project(inp, factors.tensors, f"{layer}.{role}", k, n_out, precision or info.precision, dtype,
                           name, const, out, target, weights)

        ctx = EmitContext(base, const, proj, dtype, y.dtype)
        nodes, low, values = form_of(info.form).emit_onnx(x, info, factors.tensors, layer, ctx)
        new_nodes += nodes
    terms = [low]
    delta = factors.tensors.get(f"{layer}.bias_delta")
    if delta is not None:  # a pair's new bias, as a change of the original
        terms.append(gs.Constant(const("bias_delta"), np.ascontiguousarray(delta.numpy().astype(dtype))))
        values += m
    structure = info.sparse.structure
    if structure != "none":
        idx = factors.tensors[f"{layer}.sparse_index"].numpy()
        val = factors.tensors[f"{layer}.sparse_value"].numpy().astype(np.float32)
        nodes, sp, n_values = SPARSE[structure].emit_onnx(x, idx, val, dtype, base, const, y.dtype)
        new_nodes += nodes
        values += n_values
        terms.append(sp)
    if site.bias is not None:
        terms.append(gs.Constant(f"{layer}.bias/{tag}", np.ascontiguousarray(site.bias.astype(dtype))))
    new_nodes += _sum(terms, base, y.dtype)
    new_nodes[-1].outputs = [y]  # detach only the replaced edge: y's consumers stay
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend(new_nodes)
    return values


def _sum(terms: list, base: str, dtype) -> list:
    """The Add nodes chaining ``terms`` (the last one's output is replaced by the caller)."""
    import onnx_graphsurgeon as gs

    nodes, acc = [], terms[0]
    for i, t in enumerate(terms[1:], 1):
        out = gs.Variable(f"{base}/sum{i}", dtype=dtype)
        nodes.append(gs.Node("Add", f"{base}/add{i}", {}, [acc, t], [out]))
        acc = out
    return nodes


def stored_layers(factors: Factors) -> list[str]:
    """The layers the rewrite replaces: every factored layer, and every dense layer
    stored below fp32."""
    return [n for n, i in factors.layers.items() if not i.dense or i.precision != "fp32"]


def rewrite_onnx(
    onnx_path: str | os.PathLike,
    factors_path: str | os.PathLike | Factors,
    out_path: str | os.PathLike,
    allow_partial: bool = False,
    external_data: bool | None = None,
    target: str = "onnxruntime",
    allow_mismatch: bool = False,
    weights: str = "packed",
) -> RewriteReport:
    """Rewrite every constant-weight MatMul/Gemm that has factors into its
    low-rank-plus-sparse subgraph (and every dense layer stored below fp32 into its
    stored form) and save the result.

    Args:
        onnx_path: any ONNX model (from mixrank's exporter or another one).
        factors_path: a factors file (or `Factors`).
        out_path: where to write the rewritten model (atomically).
        allow_partial: rewrite what matches even if some factors match no node.
        external_data: force (or forbid) external data; ``None`` decides by size.
        allow_mismatch: apply factors to a layer matched by name even when its weight is
            not the one they were computed from (recorded in the report).
        target: the engine the integer weights are written for: ``"onnxruntime"``
            (``MatMulNBits``) or ``"tensorrt"`` (``DequantizeLinear`` → ``MatMul``; the
            graph is converted to opset 21 when it is older).
        weights: how onnxruntime holds the integer weights (`INT_WEIGHTS`): ``"packed"``
            (``MatMulNBits``: dequantized as it runs, the codes stay in memory) or
            ``"expanded"`` (the same bytes in the file, folded into float32 weights when
            onnxruntime loads the model: float32 speed and memory) or ``"dynamic"`` (int8
            weights requantized per output channel and run as onnxruntime's dynamic int8,
            ``MatMulInteger``, each activation quantized as the graph runs: int8 compute and
            a different result; int4/int2 weights expanded). TensorRT's form is always
            ``DequantizeLinear``.

    Returns:
        `RewriteReport`.

    Raises:
        MixrankError: unreadable inputs, factors matching no node (without
            ``allow_partial``), a node matching two factors, disagreeing shapes.
    """
    import onnx_graphsurgeon as gs

    if target not in TARGETS:
        raise MixrankError(f"unknown rewrite target {target!r}; choose one of {', '.join(TARGETS)}")
    if weights not in INT_WEIGHTS:
        raise MixrankError(f"unknown integer weight form {weights!r}; choose one of {', '.join(INT_WEIGHTS)}")
    if target == "tensorrt":
        weights = "packed"  # TensorRT runs its own DequantizeLinear form
    # the output may replace the input ONNX (the API's in-place rewrite), never its weights elsewhere
    check_onnx_output(out_path, onnx_path, None if isinstance(factors_path, Factors) else factors_path,
                      overwrite=True)
    factors = factors_path if isinstance(factors_path, Factors) else load_factors(factors_path)
    model = load_onnx(onnx_path)
    integer = any(factors.layers[n].precision in ("int8", "int4") for n in stored_layers(factors))
    if target == "tensorrt" and integer:
        model = _at_opset(model, 21)
    graph = gs.import_onnx(model)
    report, matched, used = _plan_rewrite(graph, factors, onnx_path, out_path, allow_partial, allow_mismatch)
    for i, (site, layer, how) in enumerate(matched):
        info = factors.layers[layer]
        before = int(site.weight.size)
        node_name = site.node.name or f"<unnamed {site.node.op} #{i}>"
        after = _replace(graph, site, layer, factors, tag=str(i), target=target, shared=len(used[layer]) > 1,
                         weights=weights)
        report.rewritten.append({
            "node": node_name, "layer": layer, "matched_by": how, "rank": info.rank, "form": info.form,
            "precision": info.precision, "sparse": info.sparse.structure, "sparse_k": info.sparse.k,
            "params_before": before, "params_after": after, "shared": len(used[layer]) > 1,
        })
        report.params_before += before
        report.params_after += after
    report.weights = weights
    graph.cleanup().toposort()
    check_and_save(_exported(graph, model), Path(out_path), external_data)
    return report


def _plan_rewrite(graph, factors: Factors, onnx_path, out_path, allow_partial: bool, allow_mismatch: bool
                  ) -> tuple[RewriteReport, list, dict[str, list[int]]]:
    """(the report so far, the matched sites, layer → the indices of its sites).

    Raises:
        MixrankError: factors that match no node (without ``allow_partial``).
    """
    sites, skipped = find_weight_sites(graph)
    matched, dense, mismatched = match_sites(sites, factors, allow_mismatch)
    wanted = set(stored_layers(factors))
    used: dict[str, list[int]] = {}
    for i, (_s, layer, _how) in enumerate(matched):
        used.setdefault(layer, []).append(i)
    unmatched = sorted(wanted - set(used))
    if unmatched and not allow_partial:
        more = f" (and {len(unmatched) - 8} more)" if len(unmatched) > 8 else ""
        raise MixrankError(
            f"{len(unmatched)} factored layer(s) match no MatMul/Gemm in {onnx_path}: "
            f"{', '.join(unmatched[:8])}{more}; is this the model the factors were computed from? "
            "(--allow-partial rewrites what matches)")
    report = RewriteReport(dense=skipped + dense, unmatched_factors=unmatched, output=str(out_path),
                           mismatched=mismatched, allowed_mismatch=allow_mismatch)
    return report, matched, used


def _exported(graph, model):
    """The rewritten graph as a model with the original's IR version and opsets (plus
    onnxruntime's domain where its operators were written)."""
    import onnx
    import onnx_graphsurgeon as gs

    out_model = gs.export_onnx(graph)
    out_model.ir_version = model.ir_version
    out_model.opset_import.extend([o for o in model.opset_import
                                   if o.domain not in {x.domain for x in out_model.opset_import}])
    if any(n.domain == MS_DOMAIN for n in out_model.graph.node) and \
            MS_DOMAIN not in {o.domain for o in out_model.opset_import}:
        out_model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    out_model.producer_name = "mixrank"
    return out_model


def _at_opset(model, opset: int):
    """``model`` converted to ``opset`` (the ONNX version converter) when it is older."""
    import onnx

    have = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if have >= opset:
        return model
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as e:
        raise MixrankError(f"cannot convert the graph from opset {have} to {opset} (needed for TensorRT's "
                           f"block-wise dequantize): {str(e)[:200]}") from None
