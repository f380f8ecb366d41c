"""Sequential refit: later layers compensate the errors of earlier ones.

Blocks are compressed in order. For block ``b`` the inputs of its Linear layers are
collected twice on the calibration data: ``X_o`` on the original model's path and
``X_c`` on the path through the already-compressed blocks ``< b``. Each layer is
refit to reproduce the original outputs from the compressed inputs:

    min ‖X_o Wᵀ − X_c Ŵᵀ‖²  =  const + tr((W̃ − Ŵ) G_cc (W̃ − Ŵ)ᵀ),
    W̃ = W G_oc G_cc⁻¹,  G_cc = X_cᵀ X_c,  G_oc = X_oᵀ X_c,

(computed as ``W + W (G_oc − G_cc)(G_cc + λI)⁻¹``, which is exactly ``W`` where the
two paths agree, so damping adds no bias there),

so the same closed forms (low rank, sparse, compensation) apply to ``W̃`` under
``G_cc``. Needs a model whose repeated blocks are called in sequence (timm ViTs:
``blocks``); other models fall back to the independent fit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ._calibrate import move_batch, run_model
from ._fit import LayerFit
from ._select import _block_containers


class _Stop(Exception):
    pass


def block_sequence(model: nn.Module, layers: list[str]) -> tuple[str, list[list[str]]] | None:
    """The repeated-block container holding the selected layers and, per block, its
    selected layers; ``None`` when the layers are not all in one such container."""
    for cname in _block_containers(model):
        cont = model.get_submodule(cname)
        groups = []
        for i in range(len(cont)):
            prefix = f"{cname}.{i}." if cname else f"{i}."
            groups.append([n for n in layers if n.startswith(prefix)])
        if sum(len(g) for g in groups) == len(layers):
            return cname, groups
    return None


def _block_inputs(model: nn.Module, first_block: nn.Module, batches: list, device) -> list:
    """(args, kwargs) entering ``first_block`` for every batch (the model stops there)."""
    seen = []

    def hook(_m, args, kwargs):
        seen.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _Stop

    h = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    run_model(model, move_batch(b, device))
                except _Stop:
                    pass
    finally:
        h.remove()
    return seen


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def sequential_refit(
    model: nn.Module,
    layers: list[str],
    batches: list,
    fit_fn: Callable[[str, torch.Tensor, torch.Tensor], LayerFit],
    damping: float,
    progress: bool = True,
) -> dict[str, LayerFit] | None:
    """Refit every layer block by block on compressed-path statistics.

    Args:
        model: the original model (not modified).
        layers: selected layer names (all factored layers).
        batches: calibration batches (the statistics part, not the held-out part).
        fit_fn: ``fit_fn(name, W_target, G_cc) -> LayerFit`` fits one layer with its
            allocated rank and sparse size.
        damping: damping of ``G_cc`` when solving for ``W̃``.

    Returns:
        Per-layer fits, or ``None`` when the model's blocks cannot be run in sequence.
    """
    seq = block_sequence(model, layers)
    if seq is None:
        return None
    cname, groups = seq
    orig = model
    comp = copy.deepcopy(model).eval()
    dev = next(orig.parameters()).device
    blocks_o = orig.get_submodule(cname)
    blocks_c = comp.get_submodule(cname)
    ins = _block_inputs(orig, blocks_o[0], batches, dev)
    if not ins or any(len(a) != 1 or not torch.is_tensor(a[0]) for a, _ in ins):
        return None  # blocks take more than one hidden-state tensor: not supported
    h_o = [a[0] for a, _ in ins]
    h_c = [a[0].clone() for a, _ in ins]
    kws = [kw for _, kw in ins]
    fits: dict[str, LayerFit] = {}
    from ._factored import FactoredLinear, _set_module

    for b, group in enumerate(tqdm(groups, desc="sequential", unit="block", disable=not progress)):
        blk_o, blk_c = blocks_o[b], blocks_c[b]
        if group:
            stats = {n: {"cc": None, "oc": None} for n in group}
            cap: dict[str, torch.Tensor] = {}
            hooks = []
            for n in group:
                rel = n[len(f"{cname}.{b}."):]
                hooks.append(blk_o.get_submodule(rel).register_forward_pre_hook(
                    lambda _m, a, n=n, cap=cap: cap.__setitem__(("o", n), a[0])))
                hooks.append(blk_c.get_submodule(rel).register_forward_pre_hook(
                    lambda _m, a, n=n, cap=cap: cap.__setitem__(("c", n), a[0])))
            try:
                with torch.no_grad():
                    for ho, hc, kw in zip(h_o, h_c, kws, strict=True):
                        cap.clear()
                        blk_o(ho, **kw)
                        blk_c(hc, **kw)
                        for n in group:
                            xo = cap["o", n].reshape(-1, cap["o", n].shape[-1]).double()
                            xc = cap["c", n].reshape(-1, cap["c", n].shape[-1]).double()
                            st = stats[n]
                            st["cc"] = xc.T @ xc if st["cc"] is None else st["cc"].addmm_(xc.T, xc)
                            st["oc"] = xo.T @ xc if st["oc"] is None else st["oc"].addmm_(xo.T, xc)
            finally:
                for h in hooks:
                    h.remove()
            for n in group:
                Gcc, Goc = stats[n]["cc"], stats[n]["oc"]
                lam = damping * float(torch.diagonal(Gcc).mean())
                Gd = Gcc + lam * torch.eye(Gcc.shape[0], dtype=Gcc.dtype, device=Gcc.device)
                W = orig.get_submodule(n).weight.detach().double()
                # W̃ = W G_oc G_cc⁻¹ written as a correction of W, so that damping does not
                # shrink W where the paths agree: W̃ = W + W (G_oc − G_cc)(G_cc + λI)⁻¹
                Wt = W + torch.linalg.solve(Gd, (W @ (Goc - Gcc)).T).T
                fit = fit_fn(n, Wt, Gcc)
                fits[n] = fit
                lin = comp.get_submodule(n)
                sp = fit.sparse
                _set_module(comp, n, FactoredLinear(
                    fit.A.to(lin.weight), fit.B.to(lin.weight), lin.bias,
                    "none" if sp is None else sp.structure,
                    None if sp is None else sp.index, None if sp is None else sp.value.to(lin.weight)))
        with torch.no_grad():
            h_o = [_hidden(blk_o(h, **kw)) for h, kw in zip(h_o, kws, strict=True)]
            h_c = [_hidden(blk_c(h, **kw)) for h, kw in zip(h_c, kws, strict=True)]
    return fits
