"""The closed forms of attention's pairs: query-key (``qk``) and value-output (``vo``),
per head (docs/design.md, "Pairwise structures")."""

from __future__ import annotations

import torch

from ... import _linalg as linalg
from ._base import Pair
from ._spectrum import SPECTRA, PairedSpectrum, augmented, global_order, root, tails, with_bias


def qk_spectra(pair: Pair, lins: dict, stats: dict, damping: float) -> dict[str, PairedSpectrum]:
    H, d = pair.heads, pair.head_dim
    Wq, Wk = with_bias(lins[pair.first]), with_bias(lins[pair.second])
    dev = Wq.device
    Gq, Gk = augmented(stats[pair.first]).to(dev), augmented(stats[pair.second]).to(dev)
    rows_q, rows_k, sig2 = [], [], []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        Cq = Wq[sl] @ Gq @ Wq[sl].T  # (d, d): the head's query activations' Gram
        Ck = Wk[sl] @ Gk @ Wk[sl].T
        Rq, Rq_inv = root(Cq, damping)
        Rk, Rk_inv = root(Ck, damping)
        U, S, Vh = linalg.svd(Rq @ Rk)
        s = S.sqrt()
        rows_q.append((s[:, None] * U.T @ Rq_inv) @ Wq[sl])  # (d, n+1): maps of the original q
        rows_k.append((s[:, None] * Vh @ Rk_inv) @ Wk[sl])
        sig2.append(S * S)
    sig2 = torch.stack(sig2)  # (H, d)
    order = global_order(sig2)
    comp = torch.cat(rows_q)[order], torch.cat(rows_k)[order]  # component rows in global order
    slots = order  # component i of head h lives in slot h·d + i
    err = tails(sig2.reshape(-1)[order])
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


def vo_spectra(pair: Pair, lins: dict, stats: dict, damping: float) -> dict[str, PairedSpectrum]:
    H, d = pair.heads, pair.head_dim
    Wv = with_bias(lins[pair.first])  # (H d, n + 1)
    Wo = lins[pair.second].weight.detach().double()  # (m, H d)
    Go = stats[pair.second].gram.double().to(Wo.device)  # the attention-mixed values' Gram
    rows_v, cols_o, sig2 = [], [], []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        R, R_inv = root(Go[sl, sl], damping)
        U, S, Vh = linalg.svd(Wo[:, sl] @ R, full_matrices=False)  # (m, d) (d,) (d, d)
        cols_o.append(U)  # unit columns: even scales within each quantization block of A
        rows_v.append((S[:, None] * Vh @ R_inv) @ Wv[sl])  # (d, n+1)
        sig2.append(S * S)
    sig2 = torch.stack(sig2)
    order = global_order(sig2)
    V = torch.cat(rows_v)[order]
    O = torch.cat(cols_o, 1)[:, order]
    err = tails(sig2.reshape(-1)[order])
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


SPECTRA.add("qk", qk_spectra)
SPECTRA.add("vo", vo_spectra)
