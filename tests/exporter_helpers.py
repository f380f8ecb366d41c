"""Helpers for exporter tests: exact or truncated factors built straight from weights."""

from __future__ import annotations

import torch

from mixrank.compress import Factors, weight_fingerprint
from mixrank.compress._factors import FORMAT_VERSION
from mixrank.compress._sparse import fit_sparse


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
