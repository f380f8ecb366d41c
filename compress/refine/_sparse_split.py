"""The sparse split (``sparse``): part of each layer's cost given to a sparse term, the
split with the lowest layer error kept (docs/design.md, "Sparse term")."""

from __future__ import annotations

from tqdm.auto import tqdm

from mixrank.core import MixrankError

from ..factor import LayerFit, fit_layer, form_of, largest_k, sparse_cost
from ._guard import REFINEMENTS, Outcome, RefineContext, Refinement


def has_sparse_k(config) -> bool:
    """Some layer has a ``sparse_k`` override (a sparse size it must keep)."""
    return any("sparse_k" in ov for ov in config.selection.overrides.values())


def split_layer(ctx: RefineContext, name: str) -> LayerFit:
    """Split a layer's allocated cost between rank and the sparse term: try giving
    0..sparse_splits rank steps to the sparse term (or the override's sparse_k), keep
    the split with the lowest layer error, then alternate on it."""
    cfg = ctx.config
    structure, step = cfg.refine.sparse, cfg.selection.rank_step
    space, rank, spec = ctx.spaces[name], ctx.alloc[name], ctx.spectra[name]
    W, G = ctx.weights[name], ctx.calib.layers[name].gram
    m, n = space.m, space.n
    cost = space.value_cost(rank, ctx.value_bytes)  # sparse sizes are counted in values
    forced = cfg.selection.overrides.get(name, {}).get("sparse_k")
    options = []
    if forced is not None:
        left = cost - sparse_cost(structure, forced, m, n, ctx.value_bytes)
        r = min(rank, left // (m + n)) if left > 0 else 0
        if r < 1:
            raise MixrankError(
                f"override {name!r}: sparse_k={forced} leaves no room for a rank >= 1 within "
                f"the layer's budget of {cost:,} parameters")
        options.append((r, forced))
    else:
        for j in range(cfg.refine.sparse_splits + 1):
            r = rank - j * step
            if r < max(1, space.floor if space.free else 1):
                break
            k = largest_k(structure, cost - r * (m + n), m, n, ctx.value_bytes)
            if j == 0 or k > 0:
                options.append((r, k))
    best = None
    for r, k in options:
        f = fit_layer(W, G, r, structure, k, cfg.damping, 0, spec)
        if best is None or f.nmse < best[0].nmse:
            best = (f, r, k)
    f, r, k = best
    if k > 0 and cfg.refine.alternate > 0:
        f = fit_layer(W, G, r, structure, k, cfg.damping, cfg.refine.alternate, spec)
    return f


@REFINEMENTS.register("sparse")
class SparseSplit(Refinement):
    """Give part of each layer's cost to a sparse term (`split_layer`)."""

    settings = ("refine.sparse", "refine.sparse_splits", "refine.alternate", "damping")

    def enabled(self, config) -> bool:
        return config.refine.sparse != "none" and (config.refine.sparse_splits > 0 or has_sparse_k(config))

    def run(self, ctx, fits, chosen):
        out = {n: split_layer(ctx, n) if form_of(fits[n].form).plain else fits[n]
               for n in tqdm(list(fits), desc=f"sparse ({ctx.config.refine.sparse})", unit="layer",
                             disable=not ctx.progress)}
        return Outcome(f"sparse_{ctx.config.refine.sparse}", out)
