"""Scoring: the output metric (`output_loss`, in float64) and the `Evaluator` that scores
allocations and fits by the whole model's output error on held-out calibration batches
(docs/design.md, "Scoring")."""

from ._evaluator import Evaluator
from ._loss import loss_normaliser, output_error, output_loss, output_loss_sum
