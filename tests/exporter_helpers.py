"""Helpers for exporter tests: exact or truncated factors built straight from weights, and
small MLPs with their hand-built ONNX graphs (MatMul, Gemm and their variants)."""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from mixrank.compress import Factors, weight_fingerprint
from mixrank.compress.artifact import FORMAT_VERSION
from mixrank.compress.factor.sparse import fit_sparse


def factors_from_weights(model: torch.nn.Module, layers: list[str], rank: int | None = None,
                         sparse: str = "none", k: int = 0) -> Factors:
    """Factors of ``layers`` by plain SVD: exact (``rank=None``: full rank, AB = W) or
    truncated to ``rank``, optionally with a sparse term on the residual."""
    tensors, plan_layers = {}, {}
    for name in layers:
        W = model.get_submodule(name).weight.detach().double()
        m, n = W.shape
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        r = min(m, n) if rank is None else min(rank, m, n)
        A, B = (U[:, :r] * S[:r]).float(), Vh[:r].float()
        tensors[f"{name}.A"], tensors[f"{name}.B"] = A.contiguous(), B.contiguous()
        info = {"shape": [m, n], "rank": r, "dense": False,
                "sparse": {"structure": "none", "k": 0, "values": 0, "indices": 0, "params": 0},
                "sha256": weight_fingerprint(W.float()), "params_before": m * n,
                "params_after": r * (m + n)}
        if sparse != "none" and k:
            R = W - A.double() @ B.double()
            sp = fit_sparse(sparse, k, R, torch.eye(n, dtype=torch.float64), 0.0)
            tensors[f"{name}.sparse_index"] = sp.index.contiguous()
            tensors[f"{name}.sparse_value"] = sp.value.float().contiguous()
            info["sparse"] = {"structure": sparse, "k": k, "values": sp.values(),
                              "indices": sp.indices(), "params": sp.values() + sp.indices()}
            info["params_after"] += sp.values()
        plan_layers[name] = info
    return Factors(tensors, {"format_version": FORMAT_VERSION, "layers": plan_layers})


def build_graph(model: torch.nn.Sequential, forms: list[str], alphas: list[float], batch: int):
    """An ONNX graph computing ``model`` (Linear/ReLU alternating) with each Linear written
    in the given form; Gemm alpha/beta scale weight and bias so the function is unchanged."""
    nodes, inits = [], []
    x = "x"
    linears = [(i, m) for i, m in enumerate(model) if isinstance(m, torch.nn.Linear)]
    for j, ((_i, lin), form, alpha) in enumerate(zip(linears, forms, alphas, strict=True)):
        W = lin.weight.detach().numpy().astype(np.float32)
        b = lin.bias.detach().numpy().astype(np.float32)
        y = f"y{j}"
        if form in ("matmul", "matmul_add"):
            inits.append(numpy_helper.from_array(np.ascontiguousarray(W.T), f"w{j}"))
            inits.append(numpy_helper.from_array(b, f"b{j}"))
            nodes += [helper.make_node("MatMul", [x, f"w{j}"], [f"mm{j}"]),
                      helper.make_node("Add", [f"mm{j}", f"b{j}"], [y])]
        elif form == "transpose":
            inits += [numpy_helper.from_array(W, f"w{j}"), numpy_helper.from_array(b, f"b{j}")]
            nodes += [helper.make_node("Transpose", [f"w{j}"], [f"wt{j}"], perm=[1, 0]),
                      helper.make_node("MatMul", [x, f"wt{j}"], [f"mm{j}"]),
                      helper.make_node("Add", [f"b{j}", f"mm{j}"], [y])]
        elif form == "constant":
            nodes += [helper.make_node("Constant", [], [f"w{j}"],
                                       value=numpy_helper.from_array(np.ascontiguousarray(W.T), f"cw{j}")),
                      helper.make_node("MatMul", [x, f"w{j}"], [f"mm{j}"])]
            inits.append(numpy_helper.from_array(b, f"b{j}"))
            nodes.append(helper.make_node("Add", [f"mm{j}", f"b{j}"], [y]))
        else:
            trans_b = form in ("gemm_transb", "gemm_transa")
            Wg = (W if trans_b else np.ascontiguousarray(W.T)) / alpha
            inits += [numpy_helper.from_array(Wg.astype(np.float32), f"w{j}"),
                      numpy_helper.from_array((b / 0.5).astype(np.float32), f"b{j}")]
            xin = x
            if form == "gemm_transa":
                nodes.append(helper.make_node("Transpose", [x], [f"xt{j}"], perm=[1, 0]))
                xin = f"xt{j}"
            nodes.append(helper.make_node("Gemm", [xin, f"w{j}", f"b{j}"], [y], alpha=float(alpha),
                                          beta=0.5, transB=int(trans_b),
                                          transA=int(form == "gemm_transa")))
        x = y
        if j < len(linears) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{j}"]))
            x = f"r{j}"
    n0, nl = linears[0][1].in_features, linears[-1][1].out_features
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, n0])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, nl])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def mlp(dims, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(dims, dims[1:], strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).eval()


def rename_initializers(src, dst, prefix: str = "renamed_") -> None:
    """Write the ONNX file ``src`` to ``dst`` with every initializer renamed ``prefix<i>``,
    as another exporter would name them (optimum's ``onnx::MatMul_1234``): only a weight's
    fingerprint can match it then."""
    import onnx

    proto = onnx.load(str(src))
    renames = {t.name: f"{prefix}{i}" for i, t in enumerate(proto.graph.initializer)}
    for t in proto.graph.initializer:
        t.name = renames[t.name]
    for n in proto.graph.node:
        n.input[:] = [renames.get(i, i) for i in n.input]
    onnx.save(proto, str(dst))
