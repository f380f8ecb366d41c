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
``blocks``); for other models the refinement records that it did not apply.
Registered as the refinement ``sequential`` (docs/design.md, "Refinements").
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ._batches import move_batch, run_model
from ._fit import LayerFit, compensate, fit_layer
from ._optim import Schedule, descend
from ._refine import REFINEMENTS, Outcome, Refinement
from ._select import block_sequence


class _Stop(Exception):
    pass


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
    block_steps: int = 0,
    block_lr: float = 1e-3,
    block_seconds: float | None = None,
    timed_out: list | None = None,
) -> dict[str, LayerFit] | None:
    """Refit every layer block by block on compressed-path statistics.

    Args:
        model: the original model (not modified).
        layers: selected layer names (all factored layers).
        batches: calibration batches (the statistics part, not the held-out part).
        fit_fn: ``fit_fn(name, W_target, G_cc) -> LayerFit`` fits one layer with its
            allocated rank and sparse size.
        damping: damping of ``G_cc`` when solving for ``W̃``.
        block_steps: Adam steps of block reconstruction after each block's refit: all
            factors of the block move jointly so that the block's output on the
            compressed path matches the original block's output (through attention and
            MLP nonlinearities); a quarter of the batches is held out, the best held-out
            iterate is kept and the block is left as refit unless it improved (0: off).
        block_lr: Adam learning rate, relative to each tensor's mean magnitude.
        block_seconds: wall-clock bound of all block reconstructions together, shared
            equally by the blocks (``None``: none).

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
    from ._factored import _set_module, factored_from_fit, fit_from_factored

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
                        for n in group:  # per-batch products in float32, sums over batches in float64
                            xo = cap["o", n].reshape(-1, cap["o", n].shape[-1]).float()
                            xc = cap["c", n].reshape(-1, cap["c", n].shape[-1]).float()
                            st = stats[n]
                            cc, oc = (xc.T @ xc).double(), (xo.T @ xc).double()
                            st["cc"] = cc if st["cc"] is None else st["cc"].add_(cc)
                            st["oc"] = oc if st["oc"] is None else st["oc"].add_(oc)
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
                _set_module(comp, n, factored_from_fit(fit, comp.get_submodule(n)))
        with torch.no_grad():
            h_o = [_hidden(blk_o(h, **kw)) for h, kw in zip(h_o, kws, strict=True)]
        if group and block_steps > 0 and len(h_c) >= 2:
            improved, stopped = _reconstruct_block(blk_c, h_c, h_o, kws, block_steps, block_lr,
                                                   None if block_seconds is None else block_seconds / len(groups))
            if timed_out is not None:
                timed_out.append(stopped)
            for n in group:
                fits[n] = fit_from_factored(comp.get_submodule(n), fits[n])
        with torch.no_grad():
            h_c = [_hidden(blk_c(h, **kw)) for h, kw in zip(h_c, kws, strict=True)]
    return fits


def _reconstruct_block(blk: nn.Module, h_c: list, h_o_next: list, kws: list, steps: int,
                       lr: float, max_seconds: float | None = None) -> tuple[bool, bool]:
    """Adam on the FactoredLinear parameters of ``blk`` (A, B, sparse values) so that
    ``blk(h_c)`` matches the original block's output ``h_o_next``; the last quarter of
    the batches is held out and the best held-out state is kept (`descend`). Returns
    (whether the held-out error improved, whether it stopped on its time bound)."""
    from ._factored import FactoredLinear

    params = []
    for m in blk.modules():
        if isinstance(m, FactoredLinear):
            for p in (m.A, m.B, m.sparse_value, m.bias_delta):
                if p is not None:
                    params.append(p)
    if not params:
        return False, False
    frozen = [p for p in blk.parameters() if all(p is not q for q in params)]
    saved_flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    cut = max(1, len(h_c) * 3 // 4)
    train, held = list(range(cut)), list(range(cut, len(h_c)))

    def loss(step: int) -> torch.Tensor:
        i = train[step % len(train)]
        return ((_hidden(blk(h_c[i], **kws[i])) - h_o_next[i]) ** 2).mean()

    def held_err() -> float:
        with torch.no_grad():
            return sum(float(((_hidden(blk(h_c[i], **kws[i])) - h_o_next[i]) ** 2).mean()) for i in held)

    rec = descend(params, loss, held_err, Schedule(steps=steps, lr=lr, every=10, max_seconds=max_seconds))
    for p, f in zip(frozen, saved_flags, strict=True):
        p.requires_grad_(f)
    return rec["best"] < rec["start"], rec["stopped_on_time"]


@REFINEMENTS.register("sequential")
class Sequential(Refinement):
    """Every layer refit block by block on the compressed model's own activations, then
    (``block_steps``) each block's factors tuned jointly on the block's output."""

    settings = ("refine.sequential", "refine.block_steps", "refine.block_lr", "refine.block_seconds",
                "refine.alternate", "damping")
    switch = "sequential"

    def run(self, ctx, fits, chosen):
        cfg, r = ctx.config, ctx.config.refine
        with_compensation = r.compensate_steps > 0 and chosen.endswith("compensate")

        def refit(name: str, Wt: torch.Tensor, Gcc: torch.Tensor) -> LayerFit:
            b = fits[name]
            if b.form != "lowrank":
                return b  # a pair's layer: the refit is per layer, the pair's closed form stays
            sp = b.sparse
            f = fit_layer(Wt, Gcc, b.rank, "none" if sp is None else sp.structure,
                          0 if sp is None else sp.k, cfg.damping, r.alternate)
            if with_compensation:
                ref = float(torch.einsum("ij,jk,ik->", Wt, Gcc, Wt))
                f = compensate(f, Wt, Gcc, ref, r.compensate_steps, r.compensate_lr, cfg.damping)
            return f

        seconds = r.block_seconds if ctx.deadline is None else ctx.deadline.cap(r.block_seconds, share=0.5)
        timed_out: list[bool] = []
        seq = sequential_refit(ctx.model, list(fits), ctx.train, refit, cfg.damping, progress=ctx.progress,
                               block_steps=r.block_steps, block_lr=r.block_lr, block_seconds=seconds,
                               timed_out=timed_out)
        if ctx.deadline is not None:
            ctx.deadline.note("block", any(timed_out))
        if seq is None:
            return Outcome("sequential", None, note="not applicable: blocks cannot be run in sequence")
        tag = "+sequential" + ("+block" if r.block_steps else "")
        return Outcome(chosen + tag, {**fits, **seq})
