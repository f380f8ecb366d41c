"""Pairwise structures (MoDeGPT, Lin et al., ICLR 2025): compress two layers that work
as one product by shrinking the dimension they share, instead of factoring each.

A Linear layer factored at rank r costs ``r (m + n)``; a pair that shares an inner
dimension keeps ``r`` of it at ``r n + m r``, so at the same parameters it keeps about
twice the dimension. Three pairs occur in every transformer block
(docs/design.md, "Pairwise structures"):

- ``qk``: the attention logits ``q·k`` of each head are a bilinear form of the block's
  input; per head, the best rank-k form in the query and key activations' own metric
  (``C_q^½ C_k^½ = U Σ Vᵀ``) gives new query rows ``Σ^½ Uᵀ C_q^{-½}`` (q's space) and key
  rows ``Σ^½ Vᵀ C_k^{-½}``, both linear maps of the original q and k, biases included.
- ``vo``: each head's value and output projections form ``W_o,h W_v,h``; in the metric of
  the output projection's input (the attention-mixed values, whose Gram matrix the
  calibration already has), ``W_o,h G_h^½ = U Σ Vᵀ`` gives the new output columns ``U``
  and the new value rows ``Σ Vᵀ G_h^{-½}`` (again maps of the original v).
- ``mlp``: a neuron of ``fc1`` feeds ``fc2`` through an element-wise activation, so
  keeping a subset S of neurons keeps ``fc1``'s rows S unchanged; ``fc2`` is refitted on
  them by least squares over the calibration activations (Nyström:
  ``W₂' = W₂ C_{:,S} C_{S,S}⁻¹``, with its bias corrected for the mean), and S is chosen
  greedily by the output error each neuron removes (a pivoted Cholesky of ``C``).

Each layer of a pair gets one of two *forms* (`PairedSpectrum`):

- ``rows``: only r output rows are computed (``y = scatter(B x)``, B (r, n)); the other
  outputs are the original bias (their contribution is constant: a zero query or key
  component adds the same number to every logit of a row; a pruned value or neuron is
  never read by its partner).
- ``cols``: only r input columns are read (``y = A x[idx]``, A (m, r)).

Both are a low-rank pair whose other factor is a selection, stored as an index: the
rank search, the refinements, the factors file and the rewriter treat them like any
factored layer. Rules that find pairs in a model are registered in `PAIRINGS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._factor import Spectrum
from ._registry import Registry
from ._storage import selection

FORMS = ("lowrank", "rows", "cols")


@dataclass(frozen=True)
class Pair:
    """Layers that share an inner dimension. ``kind`` is ``"qk"`` (``first`` = query,
    ``second`` = key), ``"vo"`` (value, output) or ``"mlp"`` (fc1, fc2); ``heads`` and
    ``head_dim`` split the shared dimension of attention pairs."""

    kind: str
    first: str
    second: str
    heads: int = 1
    head_dim: int = 0

    @property
    def layers(self) -> tuple[str, str]:
        return self.first, self.second


class Pairing:
    """Interface: find the pairs of one architecture family in a model.

    ``find(model)`` returns every `Pair` whose layers it recognises (the caller keeps
    those whose two layers are both selected)."""

    name: str = ""

    def find(self, model: nn.Module) -> list[Pair]:
        raise NotImplementedError


PAIRINGS: Registry[Pairing] = Registry("pairing rule")


def _linear(mod, attr: str) -> bool:
    return isinstance(getattr(mod, attr, None), nn.Linear)


@PAIRINGS.register("bert")
class BertPairing(Pairing):
    """Hugging Face BERT-style encoders (BERT, RoBERTa, MiniLM, ...): ``attention.self``
    with ``query``/``key``/``value`` and ``attention.output.dense``; ``intermediate.dense``
    → ``output.dense``. Only absolute position embeddings: relative ones add a term in q
    that the bilinear form does not see."""

    def find(self, model):
        pairs = []
        for name, mod in model.named_modules():
            pre = f"{name}." if name else ""
            att = getattr(mod, "attention", None)
            sa = getattr(att, "self", None)
            if sa is not None and all(_linear(sa, a) for a in ("query", "key", "value")) \
                    and hasattr(sa, "num_attention_heads") and hasattr(sa, "attention_head_size") \
                    and getattr(sa, "position_embedding_type", "absolute") == "absolute":
                h, d = int(sa.num_attention_heads), int(sa.attention_head_size)
                if sa.query.out_features == sa.key.out_features == sa.value.out_features == h * d:
                    pairs.append(Pair("qk", f"{pre}attention.self.query", f"{pre}attention.self.key", h, d))
                    out = getattr(att, "output", None)
                    if _linear(out, "dense") and out.dense.in_features == h * d:
                        pairs.append(Pair("vo", f"{pre}attention.self.value", f"{pre}attention.output.dense", h, d))
            inter, out = getattr(mod, "intermediate", None), getattr(mod, "output", None)
            if _linear(inter, "dense") and _linear(out, "dense") and \
                    inter.dense.out_features == out.dense.in_features:
                pairs.append(Pair("mlp", f"{pre}intermediate.dense", f"{pre}output.dense"))
        return pairs


@PAIRINGS.register("timm-mlp")
class TimmMlpPairing(Pairing):
    """timm's ``Mlp`` (``fc1`` → element-wise activation → ``fc2``, no norm in between).
    timm's attention computes q, k and v in one fused Linear (``qkv``), which these forms
    do not split: its layers stay low rank."""

    def find(self, model):
        pairs = []
        for name, mod in model.named_modules():
            if type(mod).__name__ != "Mlp" or not (_linear(mod, "fc1") and _linear(mod, "fc2")):
                continue
            if not isinstance(getattr(mod, "norm", nn.Identity()), nn.Identity):
                continue
            if mod.fc1.out_features == mod.fc2.in_features:
                pre = f"{name}." if name else ""
                pairs.append(Pair("mlp", f"{pre}fc1", f"{pre}fc2"))
        return pairs


def find_pairs(model: nn.Module, eligible: list[str]) -> list[Pair]:
    """Every pair any rule finds whose two layers are both in ``eligible``, each layer in
    one pair at most (the first rule that claims it), in module order."""
    order = {n: i for i, n in enumerate(eligible)}
    taken: set[str] = set()
    out = []
    for rule in PAIRINGS:
        for p in PAIRINGS[rule].find(model):
            if all(n in order and n not in taken for n in p.layers):
                out.append(p)
                taken.update(p.layers)
    return sorted(out, key=lambda p: order[p.first])


# ------------------------------------------------------------------ spectra


@dataclass
class PairedSpectrum(Spectrum):
    """One layer of a pair, at every size r of the shared dimension.

    ``index[:r]`` are the kept output rows (form ``rows``) or input columns (``cols``);
    ``dense`` holds the kept factor's rows (``rows``: (cap, n), the B of rank r is
    ``dense[:r]``) or columns (``cols``: (m, cap)), unless ``solve`` computes it per r
    (fc2's refit depends on the whole kept set). ``bias_new[:r]`` are the kept outputs'
    new biases (``rows``; ``None``: unchanged). ``err`` is the pair's own error (the
    logits' bilinear form, the head outputs, fc2's output), in the same units for both
    layers; ``ref`` its total, so ``nmse(r)`` is the pair's relative error.
    """

    form: str = "rows"
    index: torch.Tensor = None  # (cap,) int64
    dense: torch.Tensor | None = None
    bias_new: torch.Tensor | None = None
    bias_orig: torch.Tensor | None = None
    solve: object = None  # r -> (A (m, r), bias delta (m,) or None), for a cols form that is not nested
    shape: tuple = ()
    pair: str = ""  # "qk:<first>+<second>"
    cache: dict = field(default_factory=dict)

    @property
    def nested(self) -> bool:
        return self.solve is None

    def selection(self, r: int) -> torch.Tensor:
        """The 0/1 selection factor of size r: (m, r) for ``rows``, (r, n) for ``cols``."""
        m, n = self.shape
        return selection(self.index[:r], m if self.form == "rows" else n, self.form)

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.form == "rows":
            return self.selection(r), self.dense[:r].contiguous()
        A = self.dense[:, :r].contiguous() if self.solve is None else self._solved(r)[0]
        return A, self.selection(r)

    def bias(self, r: int) -> torch.Tensor | None:
        """The bias delta (m,) at size r (new bias minus the original), or ``None``."""
        if self.form == "cols":
            return None if self.solve is None else self._solved(r)[1]
        if self.bias_new is None:
            return None
        idx = self.index[:r]
        d = torch.zeros(self.shape[0], dtype=torch.float64)
        d[idx] = self.bias_new[:r].double() - (0.0 if self.bias_orig is None else self.bias_orig[idx].double())
        return d.float()

    def _solved(self, r: int):
        if r not in self.cache:
            if len(self.cache) >= 8:
                self.cache.pop(next(iter(self.cache)))
            self.cache[r] = self.solve(r)
        return self.cache[r]

    @property
    def has_bias_delta(self) -> bool:
        return self.bias_new is not None or self.solve is not None


def form_forward(x: torch.Tensor, form: str, A: torch.Tensor | None, B: torch.Tensor | None,
                 index: torch.Tensor | None, m: int) -> torch.Tensor:
    """``x`` through a factored layer without its bias: ``rows`` computes the r outputs
    ``index`` (the others zero), ``cols`` reads the r inputs ``index``, ``lowrank`` is
    ``(x Bᵀ) Aᵀ``. The selection factor is never multiplied."""
    if form == "rows":
        h = F.linear(x, B)
        return h.new_zeros(*h.shape[:-1], m).index_copy(-1, index, h)
    if form == "cols":
        return F.linear(x.index_select(-1, index), A)
    return F.linear(F.linear(x, B), A)


def _root(C: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(C + λI)^½ and its inverse, symmetric, float64 (λ = damping · mean diag C)."""
    C = C.double()
    lam = damping * float(torch.diagonal(C).mean())
    lam = lam if lam > 0 else 1e-12
    e, Q = torch.linalg.eigh(C + lam * torch.eye(len(C), dtype=C.dtype, device=C.device))
    e = e.clamp_min(lam)
    return (Q * e.sqrt()) @ Q.T, (Q / e.sqrt()) @ Q.T


def _augmented(st) -> torch.Tensor:
    """``[[G, s], [sᵀ, N]]``: the Gram matrix of the inputs with a constant 1 appended."""
    G = st.gram.double()
    s = st.sum.double().to(G.device)
    top = torch.cat([G, s[:, None]], 1)
    bottom = torch.cat([s, torch.tensor([float(st.tokens)], dtype=G.dtype, device=G.device)])[None]
    return torch.cat([top, bottom], 0)


def _with_bias(lin: nn.Linear) -> torch.Tensor:
    W = lin.weight.detach().double()
    b = lin.bias.detach().double() if lin.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype)
    return torch.cat([W, b.to(W.device)[:, None]], 1)  # (m, n + 1)


def _global_order(sigma2: torch.Tensor) -> torch.Tensor:
    """Components (heads, d) ordered by their squared singular value, largest first, as
    slot indices ``h·d + i``; a head's values are sorted, so every prefix keeps a prefix
    of each head."""
    return torch.argsort(-sigma2.reshape(-1), stable=True)


def _qk(pair: Pair, lins: dict, stats: dict, damping: float) -> dict[str, PairedSpectrum]:
    H, d = pair.heads, pair.head_dim
    Wq, Wk = _with_bias(lins[pair.first]), _with_bias(lins[pair.second])
    dev = Wq.device
    Gq, Gk = _augmented(stats[pair.first]).to(dev), _augmented(stats[pair.second]).to(dev)
    rows_q, rows_k, sig2 = [], [], []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        Cq = Wq[sl] @ Gq @ Wq[sl].T  # (d, d): the head's query activations' Gram
        Ck = Wk[sl] @ Gk @ Wk[sl].T
        Rq, Rq_inv = _root(Cq, damping)
        Rk, Rk_inv = _root(Ck, damping)
        U, S, Vh = torch.linalg.svd(Rq @ Rk)
        s = S.sqrt()
        rows_q.append((s[:, None] * U.T @ Rq_inv) @ Wq[sl])  # (d, n+1): maps of the original q
        rows_k.append((s[:, None] * Vh @ Rk_inv) @ Wk[sl])
        sig2.append(S * S)
    sig2 = torch.stack(sig2)  # (H, d)
    order = _global_order(sig2)
    comp = torch.cat(rows_q)[order], torch.cat(rows_k)[order]  # component rows in global order
    slots = order  # component i of head h lives in slot h·d + i
    err = _tails(sig2.reshape(-1)[order])
    ref = float(sig2.sum())
    tag = f"qk:{pair.first}+{pair.second}"
    out = {}
    for name, rows in zip(pair.layers, comp, strict=True):
        lin = lins[name]
        out[name] = PairedSpectrum(
            us=torch.empty(0), vt=torch.empty(0), sigma=sig2.reshape(-1)[order].sqrt(), err=err, err_damped=err,
            ref=ref, form="rows", index=slots.cpu(), dense=rows[:, :-1].float().cpu(),
            bias_new=rows[:, -1].float().cpu(),
            bias_orig=None if lin.bias is None else lin.bias.detach().float().cpu(),
            shape=tuple(lin.weight.shape), pair=tag)
    return out


def _vo(pair: Pair, lins: dict, stats: dict, damping: float) -> dict[str, PairedSpectrum]:
    H, d = pair.heads, pair.head_dim
    Wv = _with_bias(lins[pair.first])  # (H d, n + 1)
    Wo = lins[pair.second].weight.detach().double()  # (m, H d)
    Go = stats[pair.second].gram.double().to(Wo.device)  # the attention-mixed values' Gram
    rows_v, cols_o, sig2 = [], [], []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        R, R_inv = _root(Go[sl, sl], damping)
        U, S, Vh = torch.linalg.svd(Wo[:, sl] @ R, full_matrices=False)  # (m, d) (d,) (d, d)
        cols_o.append(U)  # unit columns: even scales within each quantization block of A
        rows_v.append((S[:, None] * Vh @ R_inv) @ Wv[sl])  # (d, n+1)
        sig2.append(S * S)
    sig2 = torch.stack(sig2)
    order = _global_order(sig2)
    V = torch.cat(rows_v)[order]
    O = torch.cat(cols_o, 1)[:, order]
    err = _tails(sig2.reshape(-1)[order])
    ref = float(sig2.sum())
    tag = f"vo:{pair.first}+{pair.second}"
    lv, lo = lins[pair.first], lins[pair.second]
    common = dict(sigma=sig2.reshape(-1)[order].sqrt(), err=err, err_damped=err, ref=ref, index=order.cpu(),
                  pair=tag)
    return {
        pair.first: PairedSpectrum(
            us=torch.empty(0), vt=torch.empty(0), form="rows", dense=V[:, :-1].float().cpu(),
            bias_new=V[:, -1].float().cpu(),
            bias_orig=None if lv.bias is None else lv.bias.detach().float().cpu(),
            shape=tuple(lv.weight.shape), **common),
        pair.second: PairedSpectrum(
            us=torch.empty(0), vt=torch.empty(0), form="cols", dense=O.float().cpu(),
            shape=tuple(lo.weight.shape), **common),
    }


def _mlp(pair: Pair, lins: dict, stats: dict, damping: float) -> dict[str, PairedSpectrum]:
    fc1, fc2 = lins[pair.first], lins[pair.second]
    st = stats[pair.second]
    W2 = fc2.weight.detach().double()  # (m, h)
    dev = W2.device
    N = max(st.tokens, 1)
    mu = (st.sum.double() / N).to(dev)
    C = st.gram.double().to(dev) - N * torch.outer(mu, mu)  # centred: the bias absorbs the mean
    h = C.shape[0]
    lam = damping * float(torch.diagonal(C).mean())
    lam = lam if lam > 0 else 1e-12
    R = C + lam * torch.eye(h, dtype=C.dtype, device=dev)
    T = R @ W2.T  # (h, m)
    # greedy selection = pivoted Cholesky of R, each pivot the neuron whose inclusion removes
    # most of fc2's output error: gain_j = ‖T_j‖² / R_jj on the residual
    L = torch.zeros(h, h, dtype=C.dtype, device=dev)
    picked = torch.zeros(h, dtype=torch.bool, device=dev)
    order, gains = [], []
    tt = (T * T).sum(1)  # ‖T_j‖², kept up to date with the rank-one updates below
    diag = torch.diagonal(R).clone()
    for j in range(h):
        g = tt / diag.clamp_min(1e-300)
        g[picked] = -1.0
        p = int(torch.argmax(g))
        if float(diag[p]) <= 1e-12 * lam:
            break  # the rest is linearly dependent on what is kept
        piv = diag[p].sqrt()
        col = R[:, p] / piv
        t = T[p] / piv
        L[:, j] = col
        R.addr_(col, col, alpha=-1.0)  # in place: no (h, h) temporary per step
        T.addr_(col, t, alpha=-1.0)
        tt = (T * T).sum(1)
        diag -= col * col
        picked[p] = True
        order.append(p)
        gains.append(float(g[p]))
    k = len(order)
    L = L[:, :k]
    idx = torch.tensor(order, dtype=torch.long)
    K = W2 @ L  # (m, k): W₂ R_{:,S} = W₂ L L_Sᵀ, so W₂' = K L_S⁻¹ for the first r pivots
    Ls = L[idx.to(dev)]  # (k, k) lower triangular in pivot order
    ref = float(torch.einsum("ij,jk,ik->", W2, C, W2))
    gains_t = torch.tensor(gains, dtype=torch.float64)
    err = torch.cat([torch.tensor([ref], dtype=torch.float64), ref - torch.cumsum(gains_t, 0)]).clamp_min(0.0)

    def solve(r: int):
        A = torch.linalg.solve_triangular(Ls[:r, :r].T, K[:, :r].T, upper=True).T  # K_r L_S⁻¹, (m, r)
        delta = W2 @ mu - A @ mu[idx[:r].to(dev)]  # the new bias minus the old: E[y] is kept
        return A.float().cpu(), delta.float().cpu()

    tag = f"mlp:{pair.first}+{pair.second}"
    common = dict(sigma=gains_t.clamp_min(0).sqrt(), err=err, err_damped=err, ref=ref, index=idx, pair=tag)
    return {
        pair.first: PairedSpectrum(us=torch.empty(0), vt=torch.empty(0), form="rows",
                                   dense=fc1.weight.detach().float().cpu()[idx], shape=tuple(fc1.weight.shape),
                                   **common),
        pair.second: PairedSpectrum(us=torch.empty(0), vt=torch.empty(0), form="cols", solve=solve,
                                    shape=tuple(fc2.weight.shape), **common),
    }


def _tails(s2: torch.Tensor) -> torch.Tensor:
    """``out[r] = Σ_{i>=r} s2_i``: the error of keeping the first r components."""
    rev = torch.flip(torch.cumsum(torch.flip(s2.double(), [0]), 0), [0])
    return torch.cat([rev, rev.new_zeros(1)]).cpu()


SPECTRA = {"qk": _qk, "vo": _vo, "mlp": _mlp}


def pair_spectra(pairs: list[Pair], model: nn.Module, stats: dict, damping: float) -> dict[str, PairedSpectrum]:
    """Every paired layer's `PairedSpectrum` (``stats``: layer → `LayerStats`)."""
    lins = {n: model.get_submodule(n) for p in pairs for n in p.layers}
    out: dict[str, PairedSpectrum] = {}
    with torch.no_grad():
        for p in pairs:
            out.update(SPECTRA[p.kind](p, lins, stats, damping))
    return out
