"""The one output metric: the compressed model's output error against the original, in
float64 (docs/design.md, "Scoring"). Allocations, refinements and distillation are all
judged by `output_loss`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def output_loss(y: torch.Tensor, ref: torch.Tensor, metric: str) -> torch.Tensor:
    """Mean error of ``y`` against ``ref`` (differentiable, float64): logits KL(ref‖y),
    normalised MSE, or 1 − cosine; ``"auto"`` is normalised MSE. In float64 because a
    well-compressed model's KL (1e-6 and below) is under float32's rounding noise of
    ``Σ p (log p − log q)``."""
    y, ref = y.double(), ref.double()
    if metric == "auto":
        metric = "mse"
    if metric == "kl":
        lp, lq = F.log_softmax(ref, -1), F.log_softmax(y, -1)
        return (lp.exp() * (lp - lq)).sum(-1).mean()
    if metric == "mse":
        return ((y - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-300)
    return 1.0 - F.cosine_similarity(y.flatten(1), ref.flatten(1), dim=-1).mean()


def output_loss_sum(y: torch.Tensor, ref: torch.Tensor, metric: str) -> torch.Tensor:
    """`output_loss` before its normalisation: the sum over rows (KL, 1 − cosine) or the
    squared error (MSE); divided by `loss_normaliser` of the whole batch it is
    `output_loss`, so a batch can be summed in pieces (or over ranks)."""
    y, ref = y.double(), ref.double()
    if metric in ("auto", "mse"):
        return ((y - ref) ** 2).sum()
    if metric == "kl":
        lp, lq = F.log_softmax(ref, -1), F.log_softmax(y, -1)
        return (lp.exp() * (lp - lq)).sum()
    return (1.0 - F.cosine_similarity(y.flatten(1), ref.flatten(1), dim=-1)).sum()


def loss_normaliser(ref: torch.Tensor, rows: int, metric: str) -> torch.Tensor:
    """What `output_loss_sum` of a whole batch of ``rows`` rows is divided by (float64)."""
    if metric in ("auto", "mse"):
        return (ref.double() ** 2).sum()
    return torch.tensor(float(rows), dtype=torch.float64, device=ref.device)


def output_error(y: torch.Tensor, ref: torch.Tensor, metric: str) -> float:
    """`output_loss` as a float."""
    with torch.no_grad():
        return float(output_loss(y, ref, metric))
