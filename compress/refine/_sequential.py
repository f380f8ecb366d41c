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
``G_cc``. A pair's layers keep their form and index (`LayerForm.refit`). Needs a
model whose repeated blocks are called in sequence with the hidden state first (timm
ViTs' ``blocks``, BERT's ``encoder.layer``; the blocks' other arguments, such as the
attention mask, are passed through, and padding tokens are left out of the statistics);
for other models the refinement records that it did not apply. Registered as the
refinement ``sequential`` (docs/design.md, "Refinements").
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..artifact import FactoredLinear, factored_from_fit, fit_from_factored, set_module
from ..calibrate import block_sequence, move_batch, run_model
from ..factor import LayerFit, fit_layer, form_of, ridge_toward
from ._compensate import compensate
from ._guard import REFINEMENTS, Outcome, Refinement
from ._optim import Schedule, descend


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
        current: the current fits; a pair's layers (forms ``rows`` and ``cols``) are refit
            from them in their form (`LayerForm.refit`); a ``cols`` layer on its own pass,
            after the block's layers before it are in place, so it sees (and undoes) their
            error.
        token_mask: key of the (batch, tokens) mask of dict batches: padding tokens are
            left out of the statistics.

    Returns:
        Per-layer fits, or ``None`` when the model's blocks cannot be run in sequence.
    """
    paths = _Paths.of(model, layers, batches, token_mask)
    if paths is None:
        return None
    current = current or {}
    fits: dict[str, LayerFit] = {}
    share = None if block_seconds is None else block_seconds / len(paths.groups)
    for b, group in enumerate(tqdm(paths.groups, desc="sequential", unit="block", disable=not progress)):
        fits.update(_refit_block(paths, b, group, current, fit_fn, damping))
        blk_o, blk_c = paths.blocks_o[b], paths.blocks_c[b]
        with torch.no_grad():
            paths.h_o = [_call(blk_o, h, c) for h, c in zip(paths.h_o, paths.ctxs, strict=True)]
        if group and block_steps > 0 and len(paths.h_c) >= 2:
            _, stopped = _reconstruct_block(blk_c, paths.h_c, paths.h_o, paths.ctxs, block_steps, block_lr, share,
                                            paths.masks)
            if timed_out is not None:
                timed_out.append(stopped)
            for n in group:
                fits[n] = fit_from_factored(paths.comp.get_submodule(n), fits[n])
        with torch.no_grad():
            paths.h_c = [_call(blk_c, h, c) for h, c in zip(paths.h_c, paths.ctxs, strict=True)]
    return fits


@dataclass
class _Paths:
    """The two paths through the repeated blocks: the original model's and a copy that is
    compressed block by block (``comp``), with every batch's hidden state entering the
    current block on each (``h_o``, ``h_c``), the blocks' other arguments (``ctxs``) and
    the padding masks."""

    orig: nn.Module
    comp: nn.Module
    container: str
    groups: list[list[str]]
    h_o: list
    h_c: list
    ctxs: list
    masks: list

    @property
    def blocks_o(self) -> nn.Module:
        return self.orig.get_submodule(self.container)

    @property
    def blocks_c(self) -> nn.Module:
        return self.comp.get_submodule(self.container)

    @classmethod
    def of(cls, model: nn.Module, layers: list[str], batches: list, token_mask: str | None) -> _Paths | None:
        """The paths at the first block, or ``None`` when the blocks cannot be run in
        sequence with the hidden state first."""
        seq = block_sequence(model, layers)
        if seq is None:
            return None
        cname, groups = seq
        comp = copy.deepcopy(model).eval()
        dev = next(model.parameters()).device
        ins = _block_inputs(model, model.get_submodule(cname)[0], batches, dev)
        if not ins or any(not a or not torch.is_tensor(a[0]) for a, _ in ins):
            return None  # the blocks do not take the hidden state as their first argument
        masks = [None] * len(ins)
        if token_mask is not None:
            masks = [b[token_mask].bool() if isinstance(b, Mapping) and token_mask in b else None for b in batches]
        return cls(model, comp, cname, groups, [a[0] for a, _ in ins], [a[0].clone() for a, _ in ins],
                   [(a[1:], kw) for a, kw in ins], masks)


def _refit_block(paths: _Paths, b: int, group: list[str], current: dict[str, LayerFit], fit_fn: Callable,
                 damping: float) -> dict[str, LayerFit]:
    """Block ``b``'s layers refit on the compressed path's inputs, each put in place in the
    compressed copy. A layer whose form has a pass of its own (`LayerForm.own_pass`: the
    second layer of a pair) is refit after every layer before it in the block is in
    place: it sees, and undoes, their errors."""
    pre = f"{paths.container}.{b}." if paths.container else f"{b}."

    def form(n: str):
        return form_of(current[n].form if n in current else "lowrank")

    parts: list[list[str]] = [[]]
    for n in group:
        if form(n).own_pass:
            parts += [[n], []]
        else:
            parts[-1].append(n)
    fits = {}
    for part in (p for p in parts if p):
        stats = _cross_stats(paths.blocks_o[b], paths.blocks_c[b], {n: n[len(pre):] for n in part}, paths.h_o,
                             paths.h_c, paths.ctxs, paths.masks)
        for n in part:
            st, lin = stats[n], paths.orig.get_submodule(n)
            if not form(n).plain:  # a pair's layer, a residual: the form refits itself
                fit = form(n).refit(current[n], lin, st, damping)
            else:
                # W̃ = W G_oc G_cc⁻¹, damped toward W, so that damping does not shrink W
                # where the paths agree: W̃ = W + W (G_oc − G_cc)(G_cc + λI)⁻¹
                W = lin.weight.detach().double()
                fit = fit_fn(n, ridge_toward(W, W @ st["oc"], st["cc"], damping), st["cc"])
            fits[n] = fit
            set_module(paths.comp, n, factored_from_fit(fit, paths.comp.get_submodule(n)))
    return fits


def _reconstruct_block(blk: nn.Module, h_c: list, h_o_next: list, ctxs: list, steps: int,
                       lr: float, max_seconds: float | None = None, masks: list | None = None) -> tuple[bool, bool]:
    """Adam on the FactoredLinear parameters of ``blk`` (A, B, sparse values) so that
    ``blk(h_c)`` matches the original block's output ``h_o_next`` on the real tokens
    (``masks``: per batch, the padding mask or ``None``); the last quarter of
    the batches is held out and the best held-out state is kept (`descend`). Returns
    (whether the held-out error improved, whether it stopped on its time bound)."""
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
