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
``G_cc``. A pair's layers keep their form and index (`_refit_pair_layer`). Needs a
model whose repeated blocks are called in sequence with the hidden state first (timm
ViTs' ``blocks``, BERT's ``encoder.layer``; the blocks' other arguments, such as the
attention mask, are passed through, and padding tokens are left out of the statistics);
for other models the refinement records that it did not apply. Registered as the
refinement ``sequential`` (docs/design.md, "Refinements").
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

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


def _call(blk: nn.Module, h: torch.Tensor, ctx: tuple) -> torch.Tensor:
    """The block on hidden state ``h`` with the batch's other arguments ``ctx`` =
    (positional arguments after the hidden state, keyword arguments)."""
    rest, kw = ctx
    return _hidden(blk(h, *rest, **kw))


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` as (tokens, width) float32, without the masked-out (padding) tokens."""
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1]).float()


def _cross_stats(blk_o, blk_c, rels: dict[str, str], h_o, h_c, ctxs, masks) -> dict[str, dict]:
    """Per layer (name → path inside the block), sums over the batches of the inputs on
    both paths: ``cc = Σ x_c x_cᵀ``, ``oc = Σ x_o x_cᵀ``, ``so = Σ x_o``, ``sc = Σ x_c``
    and the token count (float64; the per-batch products in float32)."""
    stats = {n: {"cc": None, "oc": None, "so": None, "sc": None, "n": 0} for n in rels}
    cap: dict = {}
    hooks = []
    for n, rel in rels.items():
        hooks.append(blk_o.get_submodule(rel).register_forward_pre_hook(
            lambda _m, a, n=n: cap.__setitem__(("o", n), a[0])))
        hooks.append(blk_c.get_submodule(rel).register_forward_pre_hook(
            lambda _m, a, n=n: cap.__setitem__(("c", n), a[0])))
    try:
        with torch.no_grad():
            for ho, hc, ctx, mask in zip(h_o, h_c, ctxs, masks, strict=True):
                cap.clear()
                _call(blk_o, ho, ctx)
                _call(blk_c, hc, ctx)
                for n in rels:
                    xo, xc = _tokens(cap["o", n], mask), _tokens(cap["c", n], mask)
                    st = stats[n]
                    for key, v in (("cc", xc.T @ xc), ("oc", xo.T @ xc), ("so", xo.sum(0)), ("sc", xc.sum(0))):
                        v = v.double()
                        st[key] = v if st[key] is None else st[key].add_(v)
                    st["n"] += xc.shape[0]
    finally:
        for h in hooks:
            h.remove()
    return stats


def _augment(st: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross statistics with a constant 1 appended to the inputs: (``E[z_c z_cᵀ]``,
    ``E[z_o z_cᵀ]``) as sums, z = [x; 1]."""
    n = torch.tensor([[float(st["n"])]], dtype=torch.float64, device=st["cc"].device)
    cc = torch.cat([torch.cat([st["cc"], st["sc"][:, None]], 1), torch.cat([st["sc"][None], n], 1)], 0)
    oc = torch.cat([torch.cat([st["oc"], st["so"][:, None]], 1), torch.cat([st["sc"][None], n], 1)], 0)
    return cc, oc


def _ridge_toward(M0: torch.Tensor, P: torch.Tensor, G: torch.Tensor, damping: float) -> torch.Tensor:
    """``argmin_M tr(M G Mᵀ) − 2 tr(M Pᵀ) + λ‖M − M0‖²``: the least-squares fit whose
    normal equations are ``M G = P``, damped toward ``M0`` instead of toward zero
    (``M0 + (P − M0 G)(G + λI)⁻¹``; λ = damping · mean diag G)."""
    lam = damping * float(torch.diagonal(G).mean())
    lam = lam if lam > 0 else 1e-12
    Gd = G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return M0 + torch.linalg.solve(Gd, (P - M0 @ G).T).T


def _refit_pair_layer(fit: LayerFit, lin: nn.Linear, st: dict, damping: float) -> LayerFit:
    """A pair's layer refit on the compressed path's inputs, its form and index kept.

    ``rows`` (``y[idx] = B x + b'``): the kept rows are linear maps of the original
    layer's outputs, so each is refit to reproduce its own value on the original path,
    ``[B b'] z_o`` from ``z_c``. ``cols`` (``y = A x[idx] + b + δ``): A and δ are refit so
    that the layer reproduces the original layer's output ``[W b] z_o`` from the kept
    inputs of the compressed path. Both are least squares, damped toward the current
    factors (`_ridge_toward`); a layer that stores no bias delta (its fit's ``bias`` is
    ``None``) keeps its bias, so the plan's bytes still hold."""
    # a layer whose plan stores no bias delta keeps its bias: the fit has no constant input
    with_delta = fit.bias is not None
    cc, oc = _augment(st) if with_delta else (st["cc"], st["oc"])
    W = lin.weight.detach().double().to(cc.device)
    b0 = lin.bias.detach().double().to(cc.device) if lin.bias is not None else W.new_zeros(W.shape[0])
    delta = fit.bias.double().to(cc.device) if with_delta else W.new_zeros(W.shape[0])
    idx = fit.index.to(cc.device)
    if fit.form == "rows":
        M0 = fit.B.double().to(cc.device)  # (r, n), with the kept biases as a last column
        M0 = torch.cat([M0, (b0 + delta)[idx][:, None]], 1) if with_delta else M0
        M = _ridge_toward(M0, M0 @ oc, cc, damping)
        if not with_delta:
            return fit.replace(B=M.float().cpu())
        bias = torch.zeros_like(b0)
        bias[idx] = M[:, -1] - b0[idx]
        return fit.replace(B=M[:, :-1].float().cpu(), bias=bias.float().cpu())
    if not with_delta:
        M = _ridge_toward(fit.A.double().to(cc.device), W @ oc[:, idx], cc[idx][:, idx], damping)
        return fit.replace(A=M.float().cpu())
    keep = torch.cat([idx, torch.tensor([cc.shape[0] - 1], device=cc.device)])  # the kept inputs and the 1
    M0 = torch.cat([fit.A.double().to(cc.device), (b0 + delta)[:, None]], 1)  # (m, r + 1)
    P = torch.cat([W, b0[:, None]], 1) @ oc[:, keep]
    M = _ridge_toward(M0, P, cc[keep][:, keep], damping)
    return fit.replace(A=M[:, :-1].float().cpu(), bias=(M[:, -1] - b0).float().cpu())


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
    current: dict[str, LayerFit] | None = None,
    token_mask: str | None = None,
) -> dict[str, LayerFit] | None:
    """Refit every layer block by block on compressed-path statistics.

    Args:
        model: the original model (not modified).
        layers: selected layer names (all factored layers).
        batches: calibration batches (the statistics part, not the held-out part).
        fit_fn: ``fit_fn(name, W_target, G_cc) -> LayerFit`` fits one low-rank layer with
            its allocated rank and sparse size.
        damping: damping of ``G_cc`` when solving for ``W̃``.
        block_steps: Adam steps of block reconstruction after each block's refit: all
            factors of the block move jointly so that the block's output on the
            compressed path matches the original block's output (through attention and
            MLP nonlinearities); a quarter of the batches is held out, the best held-out
            iterate is kept and the block is left as refit unless it improved (0: off).
        block_lr: Adam learning rate, relative to each tensor's mean magnitude.
        block_seconds: wall-clock bound of all block reconstructions together, shared
            equally by the blocks (``None``: none).
        current: the current fits; a pair's layers (form ``rows`` or ``cols``) are refit
            from them in their form (`_refit_pair_layer`); a ``cols`` layer on its own
            pass, after the block's layers before it are in place, so it sees (and undoes)
            their error.
        token_mask: key of the (batch, tokens) mask of dict batches: padding tokens are
            left out of the statistics.

    Returns:
        Per-layer fits, or ``None`` when the model's blocks cannot be run in sequence.
    """
    seq = block_sequence(model, layers)
    if seq is None:
        return None
    cname, groups = seq
    current = current or {}
    orig = model
    comp = copy.deepcopy(model).eval()
    dev = next(orig.parameters()).device
    blocks_o = orig.get_submodule(cname)
    blocks_c = comp.get_submodule(cname)
    ins = _block_inputs(orig, blocks_o[0], batches, dev)
    if not ins or any(not a or not torch.is_tensor(a[0]) for a, _ in ins):
        return None  # the blocks do not take the hidden state as their first argument
    h_o = [a[0] for a, _ in ins]
    h_c = [a[0].clone() for a, _ in ins]
    ctxs = [(a[1:], kw) for a, kw in ins]
    masks = [None] * len(ins)
    if token_mask is not None:
        masks = [b[token_mask].bool() if isinstance(b, Mapping) and token_mask in b else None for b in batches]
    fits: dict[str, LayerFit] = {}
    from ._factored import _set_module, factored_from_fit, fit_from_factored

    def form(n: str) -> str:
        return current[n].form if n in current else "lowrank"

    for b, group in enumerate(tqdm(groups, desc="sequential", unit="block", disable=not progress)):
        blk_o, blk_c = blocks_o[b], blocks_c[b]
        pre = f"{cname}.{b}." if cname else f"{b}."
        # a cols layer (the second of a pair) is refit on its own pass, after every layer
        # before it in the block is in place: it sees, and undoes, their errors
        parts: list[list[str]] = [[]]
        for n in group:
            if form(n) == "cols":
                parts += [[n], []]
            else:
                parts[-1].append(n)
        for part in (p for p in parts if p):
            stats = _cross_stats(blk_o, blk_c, {n: n[len(pre):] for n in part}, h_o, h_c, ctxs, masks)
            for n in part:
                st = stats[n]
                if form(n) != "lowrank":
                    fit = _refit_pair_layer(current[n], orig.get_submodule(n), st, damping)
                else:
                    # W̃ = W G_oc G_cc⁻¹, damped toward W, so that damping does not shrink W
                    # where the paths agree: W̃ = W + W (G_oc − G_cc)(G_cc + λI)⁻¹
                    W = orig.get_submodule(n).weight.detach().double()
                    fit = fit_fn(n, _ridge_toward(W, W @ st["oc"], st["cc"], damping), st["cc"])
                fits[n] = fit
                _set_module(comp, n, factored_from_fit(fit, comp.get_submodule(n)))
        with torch.no_grad():
            h_o = [_call(blk_o, h, c) for h, c in zip(h_o, ctxs, strict=True)]
        if group and block_steps > 0 and len(h_c) >= 2:
            improved, stopped = _reconstruct_block(blk_c, h_c, h_o, ctxs, block_steps, block_lr,
                                                   None if block_seconds is None else block_seconds / len(groups),
                                                   masks)
            if timed_out is not None:
                timed_out.append(stopped)
            for n in group:
                fits[n] = fit_from_factored(comp.get_submodule(n), fits[n])
        with torch.no_grad():
            h_c = [_call(blk_c, h, c) for h, c in zip(h_c, ctxs, strict=True)]
    return fits


def _reconstruct_block(blk: nn.Module, h_c: list, h_o_next: list, ctxs: list, steps: int,
                       lr: float, max_seconds: float | None = None, masks: list | None = None) -> tuple[bool, bool]:
    """Adam on the FactoredLinear parameters of ``blk`` (A, B, sparse values) so that
    ``blk(h_c)`` matches the original block's output ``h_o_next`` on the real tokens
    (``masks``: per batch, the padding mask or ``None``); the last quarter of
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

    masks = masks or [None] * len(h_c)

    def err(i: int) -> torch.Tensor:  # mean squared error over the real (unmasked) tokens
        return (_tokens(_call(blk, h_c[i], ctxs[i]) - h_o_next[i], masks[i]) ** 2).mean()

    def loss(step: int) -> torch.Tensor:
        return err(train[step % len(train)])

    def held_err() -> float:
        with torch.no_grad():
            return sum(float(err(i)) for i in held)

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
                               timed_out=timed_out, current=fits, token_mask=cfg.token_mask)
        if ctx.deadline is not None:
            ctx.deadline.note("block", any(timed_out))
        if seq is None:
            return Outcome("sequential", None, note="not applicable: blocks cannot be run in sequence")
        tag = "+sequential" + ("+block" if r.block_steps else "")
        return Outcome(chosen + tag, {**fits, **seq})
