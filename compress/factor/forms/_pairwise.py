"""The forms of a pair's layers (`mixrank.compress.factor.pairs`): a low-rank pair whose
other factor is a selection, stored as an index.

- ``rows``: only r output rows are computed, ``y[..., index] = x Bᵀ`` (B (r, n)), the
  other outputs zero before the bias. Stored: ``<name>.B``, ``<name>.index``; exported as
  MatMul → Gather (by an m-entry inverse index) → Mul (by a 0/1 mask).
- ``cols``: only r input columns are read, ``y = x[..., index] Aᵀ`` (A (m, r)). Stored:
  ``<name>.A``, ``<name>.index``; exported as Gather → MatMul.

Either may store ``<name>.bias_delta`` (float32, (m,), added to the original bias).
"""

from __future__ import annotations

import numpy as np
import torch

from ...store import StoredFactors, read_back, ste, storage_bytes, store_weight
from .._spectrum import ridge_toward
from ._base import FORMS, LayerForm, linear


class _Pairwise(LayerForm):
    """What the two forms of a pair share: one factor, an index, a bias delta."""

    paired = True
    role = ""  # the stored factor: "B" for rows, "A" for cols

    def max_rank(self, m, n, size):
        return size

    def stored_bytes(self, space, r):
        m, n = space.m, space.n
        rows, k = (r, n) if self.role == "B" else (m, r)  # B (r, n) over n; A (m, r) over r
        return (storage_bytes(rows, k, space.precision, space.block, space.symmetric)
                + 4 * self.extra(m, r, space.bias_delta))

    def selection(self, index: torch.Tensor, size: int) -> torch.Tensor:
        """The 0/1 selection factor: (size, r) for ``rows`` (output row ``index[j]`` is
        component j), (r, size) for ``cols`` (component j reads input ``index[j]``)."""
        r, idx = index.numel(), index.long()
        E = torch.zeros(size, r) if self.role == "B" else torch.zeros(r, size)
        if self.role == "B":
            E[idx, torch.arange(r)] = 1.0
        else:
            E[torch.arange(r), idx] = 1.0
        return E

    def straight_through(self, A, B, precision, quant):
        sym = quant.scheme == "symmetric"
        if self.role == "B":
            return A, ste(B, precision, quant.block, sym)
        return ste(A, precision, quant.block, sym), B

    def store(self, fit, precision, quant, G=None):
        """The one factor at ``precision`` (B over the layer's inputs, Gram ``G``; A over the
        kept columns, Gram ``G[idx, idx]``), the index and the bias delta; the selection
        factor comes back as given."""
        idx = fit.index.long()
        if self.role == "B":
            stored, B = store_weight(fit.B, precision, quant, G, role="B")
            A = fit.A
        else:
            Gs = None if G is None else G.to(idx.device)[idx][:, idx]
            stored, A = store_weight(fit.A, precision, quant, Gs, role="A")
            B = fit.B
        stored["index"] = fit.index.to(torch.int32)
        if fit.bias is not None:
            stored["bias_delta"] = fit.bias.float()
        return StoredFactors(stored, A.float(), B.float())

    def refit(self, fit, lin, stats, damping):
        """Least squares damped toward the current factors (`ridge_toward`): a ``rows``
        layer's kept rows reproduce their own values on the original path, ``[B b'] z_o``
        from ``z_c``; a ``cols`` layer reproduces the original layer's output ``[W b] z_o``
        from the compressed path's kept inputs. A layer that stores no bias delta (its fit's
        ``bias`` is ``None``) keeps its bias, so the plan's bytes still hold."""
        with_delta = fit.bias is not None  # without a stored delta the fit has no constant input
        cc, oc = _augment(stats) if with_delta else (stats["cc"], stats["oc"])
        W = lin.weight.detach().double().to(cc.device)
        b0 = lin.bias.detach().double().to(cc.device) if lin.bias is not None else W.new_zeros(W.shape[0])
        delta = fit.bias.double().to(cc.device) if with_delta else W.new_zeros(W.shape[0])
        return self._refit(fit, W, b0, b0 + delta, fit.index.to(cc.device), cc, oc, with_delta, damping)


@FORMS.register("rows")
class Rows(_Pairwise):
    trainable = ("B",)
    role = "B"

    def extra(self, m, r, bias_delta):
        return 2 * m + (m if bias_delta else 0)  # an int32 index and a float32 mask over the m outputs

    def values(self, m, n, r):
        return r * n

    def per_rank(self, m, n):
        return n

    def forward(self, x, A, B, index, m, residual=None, linear=linear):
        h = linear(x, B, "B")
        return h.new_zeros(*h.shape[:-1], m).index_copy(-1, index, h)

    def read(self, tensors, name, info):
        m, n = info.shape
        return self.selection(tensors[f"{name}.index"], m), read_back(tensors, f"{name}.B", n, info.precision)

    def products(self):
        return (("in", "B"), ("scatter", ""))  # the r computed rows, scattered back to m by a gather and a mask

    def emit_onnx(self, x, info, tensors, layer, ctx):
        import onnx_graphsurgeon as gs

        (m, n), r = info.shape, info.rank
        idx = tensors[f"{layer}.index"].numpy().astype(np.int64)
        inv = np.zeros(m, np.int32)
        inv[idx] = np.arange(r, dtype=np.int32)
        mask = np.zeros(m, ctx.dtype)
        mask[idx] = 1
        h = gs.Variable(f"{ctx.base}/xb", dtype=ctx.out_dtype)
        g = gs.Variable(f"{ctx.base}/scattered", dtype=ctx.out_dtype)
        low = gs.Variable(f"{ctx.base}/low_rank", dtype=ctx.out_dtype)
        nodes = ctx.project(x, "B", n, r, f"{ctx.base}/matmul_b", h)
        nodes += [gs.Node("Gather", f"{ctx.base}/scatter", {"axis": -1}, [h, gs.Constant(ctx.const("inv"), inv)], [g]),
                  gs.Node("Mul", f"{ctx.base}/mask", {}, [g, gs.Constant(ctx.const("mask"), mask)], [low])]
        return nodes, low, r * n + 2 * m

    def _refit(self, fit, W, b0, b, idx, cc, oc, with_delta, damping):
        M0 = fit.B.double().to(cc.device)  # (r, n), with the kept biases as a last column
        M0 = torch.cat([M0, b[idx][:, None]], 1) if with_delta else M0
        M = ridge_toward(M0, M0 @ oc, cc, damping)
        if not with_delta:
            return fit.replace(B=M.float().cpu())
        bias = torch.zeros_like(b0)
        bias[idx] = M[:, -1] - b0[idx]
        return fit.replace(B=M[:, :-1].float().cpu(), bias=bias.float().cpu())


@FORMS.register("cols")
class Cols(_Pairwise):
    trainable = ("A",)
    role = "A"
    own_pass = True

    def extra(self, m, r, bias_delta):
        return r + (m if bias_delta else 0)  # the r int32 indices of the inputs it reads

    def values(self, m, n, r):
        return m * r

    def per_rank(self, m, n):
        return m + 1

    def forward(self, x, A, B, index, m, residual=None, linear=linear):
        return linear(x.index_select(-1, index), A, "A")

    def read(self, tensors, name, info):
        return (read_back(tensors, f"{name}.A", info.rank, info.precision),
                self.selection(tensors[f"{name}.index"], info.shape[1]))

    def products(self):
        return (("gather", ""), ("out", "A"))  # the r kept input columns gathered, then A

    def emit_onnx(self, x, info, tensors, layer, ctx):
        import onnx_graphsurgeon as gs

        m, r = info.shape[0], info.rank
        idx = tensors[f"{layer}.index"].numpy().astype(np.int32)
        xs = gs.Variable(f"{ctx.base}/x_kept", dtype=ctx.out_dtype)
        low = gs.Variable(f"{ctx.base}/low_rank", dtype=ctx.out_dtype)
        nodes = [gs.Node("Gather", f"{ctx.base}/gather", {"axis": -1}, [x, gs.Constant(ctx.const("index"), idx)],
                         [xs])]
        nodes += ctx.project(xs, "A", r, m, f"{ctx.base}/matmul_a", low)
        return nodes, low, m * r + r

    def _refit(self, fit, W, b0, b, idx, cc, oc, with_delta, damping):
        if not with_delta:
            M = ridge_toward(fit.A.double().to(cc.device), W @ oc[:, idx], cc[idx][:, idx], damping)
            return fit.replace(A=M.float().cpu())
        keep = torch.cat([idx, torch.tensor([cc.shape[0] - 1], device=cc.device)])  # the kept inputs and the 1
        M0 = torch.cat([fit.A.double().to(cc.device), b[:, None]], 1)  # (m, r + 1)
        P = torch.cat([W, b0[:, None]], 1) @ oc[:, keep]
        M = ridge_toward(M0, P, cc[keep][:, keep], damping)
        return fit.replace(A=M[:, :-1].float().cpu(), bias=(M[:, -1] - b0).float().cpu())


def _augment(st: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross statistics with a constant 1 appended to the inputs: (``E[z_c z_cᵀ]``,
    ``E[z_o z_cᵀ]``) as sums, z = [x; 1]."""
    n = torch.tensor([[float(st["n"])]], dtype=torch.float64, device=st["cc"].device)
    cc = torch.cat([torch.cat([st["cc"], st["sc"][:, None]], 1), torch.cat([st["sc"][None], n], 1)], 0)
    oc = torch.cat([torch.cat([st["oc"], st["so"][:, None]], 1), torch.cat([st["sc"][None], n], 1)], 0)
    return cc, oc
