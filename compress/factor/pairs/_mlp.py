"""The closed form of an MLP's pair (``mlp``): Nyström selection of the hidden neurons,
the second layer refit on them (docs/design.md, "Pairwise structures")."""

from __future__ import annotations

import torch

from ... import _linalg as linalg
from ._base import Pair
from ._spectrum import SPECTRA, PairedSpectrum


def mlp_spectra(pair: Pair, lins: dict, stats: dict, damping: float) -> dict[str, PairedSpectrum]:
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
        A = linalg.solve_triangular(Ls[:r, :r].T, K[:, :r].T, upper=True).T  # K_r L_S⁻¹, (m, r)
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


SPECTRA.add("mlp", mlp_spectra)
