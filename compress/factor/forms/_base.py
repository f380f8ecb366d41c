"""Layer forms: how a factored layer computes ``y = W x`` from what it stores.

A form is a `LayerForm` registered in `FORMS` under the name the plan records
(``LayerPlan.form``). It owns everything that depends on its shape: what it costs (in
values and in bytes as the exporter writes them), the PyTorch forward, how its factors
are stored and read back, its straight-through rounding for quantization-aware
training, and the ONNX subgraph the rewriter emits. The allocator, the scorer, the
factored model, the factors file and the rewriter reach a form only through `FORMS`
(docs/design.md, "Adding a layer form").

The built-in forms: ``lowrank`` (``A B``, `mixrank.compress.factor.forms._lowrank`), and
the two forms of a pair's layers (``rows``, ``cols``; `._pairwise`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixrank.core import Registry


def linear(x: torch.Tensor, W: torch.Tensor, role: str) -> torch.Tensor:
    """``x Wᵀ``: how a form multiplies by its stored weight ``role`` unless told otherwise."""
    return torch.nn.functional.linear(x, W)


@dataclass(frozen=True)
class EmitContext:
    """What a form's ONNX emitter is given by the rewriter.

    Attributes:
        base: prefix of the names of the nodes it adds (unique per rewritten node).
        const: ``const(what)`` names a constant uniquely in the graph.
        project: ``project(x, role, k, n_out, node, out, precision=None)``: the nodes
            computing ``out = x Wᵀ`` for the stored tensor ``role`` (``"A"``, ``"B"``, or a
            residual's ``"W"``) of the layer, at ``precision`` (``None``: the layer's) and in
            the form the target engine runs (`mixrank.exporter`).
        dtype: numpy dtype of the graph's weights.
        out_dtype: the dtype of the layer's output tensor.
    """

    base: str
    const: Callable[[str], str]
    project: Callable
    dtype: type
    out_dtype: object


class LayerForm:
    """Interface of a layer form. ``m, n`` are the layer's (out, in); ``r`` its rank (the
    size of the shared dimension for a pair's layer).

    Attributes:
        trainable: the factors a gradient refinement moves (a selection never moves).
        paired: the form of a pair's layer: its error is the pair's (per-layer compensation
            and the sparse split leave it as it is), and the sequential refit refits it in
            its form (`refit`).
        own_pass: the sequential refit fits it on a pass of its own, once the block's
            layers before it are in place (it reads, and undoes, their error).
        plain: a plain factor pair (``A B`` and nothing else): the sparse split and
            per-layer compensation apply to it, and the sequential refit refits it with the
            factorizer's closed form; any other form refits itself (`refit`).
    """

    name: str = ""
    trainable: tuple[str, ...] = ("A", "B")
    paired: bool = False
    own_pass: bool = False
    plain: bool = False

    def extra(self, m: int, r: int, bias_delta: bool) -> int:
        """Values beyond the factors, in 4-byte values as the exporter writes them
        (indices, masks, a bias delta)."""
        return 0

    def values(self, m: int, n: int, r: int) -> int:
        """Weight values of the stored factors."""
        raise NotImplementedError

    def cost_params(self, m: int, n: int, r: int, bias_delta: bool = False) -> int:
        """What rank ``r`` costs in parameters: the factors' values plus `extra`."""
        return self.values(m, n, r) + self.extra(m, r, bias_delta)

    def per_rank(self, m: int, n: int) -> int:
        """Parameters one unit of rank costs."""
        raise NotImplementedError

    def max_rank(self, m: int, n: int, size: int) -> int:
        """The largest rank worth offering before the dense layer is cheaper (``size``: the
        largest a pair's spectrum has; 0 for a layer of no pair)."""
        raise NotImplementedError

    def stored_bytes(self, space, r: int) -> int:
        """Bytes as the exporter stores rank ``r`` of the layer whose choices are ``space``
        (a `LayerSpace`: shape, precision, block, scheme, bias delta, residual storage),
        integer blocks padded, scales and zero points included."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor | None,
                index: torch.Tensor | None, m: int, residual: torch.Tensor | None = None,
                linear=linear) -> torch.Tensor:
        """``x`` (..., n) through the factors (and a ``residual`` form's dense term,
        (m, n)), without the bias: (..., m). Every product with a stored weight goes through
        ``linear(x, W, role)`` (role ``"A"``, ``"B"`` or ``"W"``, the residual term): by
        default ``x Wᵀ``; the factored model's engine simulation (`FactoredLinear.dynamic`)
        passes its own."""
        raise NotImplementedError

    def straight_through(self, A: torch.Tensor | None, B: torch.Tensor | None, precision: str, quant
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The factors as stored (rounded), differentiable in the trainable ones
        (quantization-aware distillation)."""
        raise NotImplementedError

    def store(self, fit, precision: str, quant, G: torch.Tensor | None = None):
        """A `LayerFit` of this form as stored at ``precision``: `StoredFactors` (tensors by
        suffix of the layer's name, A and B as read back, float32). ``G``: the layer's input
        Gram matrix (GPTQ), or ``None``."""
        raise NotImplementedError

    def read(self, tensors: dict[str, torch.Tensor], name: str, info) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of layer ``name`` as its factors file stores them, float32 (a selection as
        its 0/1 matrix); ``info`` is the layer's `LayerPlan`."""
        raise NotImplementedError

    def read_residual(self, tensors: dict[str, torch.Tensor], name: str, info) -> torch.Tensor | None:
        """The dense term the form adds to its factors, (m, n) float32 as stored (``None``:
        it has none)."""
        return None

    def products(self) -> tuple[tuple[str, str], ...]:
        """The matrix products its ONNX subgraph runs, for the latency model
        (`mixrank.compress.allocate.LatencyTable`): each ``(shape, role)``. ``shape`` is
        ``"in"`` (``x`` (..., n) times an (n, r) factor), ``"out"`` ((..., r) times an
        (r, m) factor) or ``"dense"`` ((..., n) times (n, m)); ``role`` is the stored
        tensor (``"A"``, ``"B"``, ``"W"``) whose precision says how the engine computes it.
        A pair's layers add ``("gather", "")`` (r of the n input columns gathered) or
        ``("scatter", "")`` (r rows gathered back to m, times a mask): on 2 cores these
        memory-bound steps cost as much as a product. Additions are left out."""
        raise NotImplementedError

    def emit_onnx(self, x, info, tensors: dict, layer: str, ctx: EmitContext) -> tuple[list, object, int]:
        """The ONNX subgraph of ``x`` through the factors, without the bias.

        Args:
            x: the activation tensor (gs.Variable, (..., n)).
            info: the layer's `LayerPlan`; tensors: the factors file's tensors.
            layer: the layer's qualified name; ctx: `EmitContext`.

        Returns:
            (nodes, output gs.Variable, number of weight values the constants hold).
        """
        raise NotImplementedError

    def refit(self, fit, lin: torch.nn.Linear, stats: dict, damping: float):
        """A fit of this form (not `plain`) refit on the compressed path's statistics (the
        sequential refit; ``stats``: its cross statistics of the layer's inputs, ``cc``,
        ``oc``, ``sc``, ``so``, ``n``)."""
        raise NotImplementedError


FORMS: Registry[LayerForm] = Registry("layer form")


def form_of(name: str | None) -> LayerForm:
    """The registered form ``name`` (an empty name, written by older files: ``lowrank``)."""
    return FORMS[name or "lowrank"]
