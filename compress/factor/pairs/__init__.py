"""Pairwise structures (MoDeGPT, Lin et al., ICLR 2025): compress two layers that work
as one product by shrinking the dimension they share, instead of factoring each.

A Linear layer factored at rank r costs ``r (m + n)``; a pair that shares an inner
dimension keeps ``r`` of it at ``r n + m r``, so at the same parameters it keeps about
twice the dimension. Three pairs occur in every transformer block
(docs/design.md, "Pairwise structures"):

- ``qk``: the attention logits ``q·k`` of each head are a bilinear form of the block's
  input; per head, the best rank-k form in the query and key activations' own metric
  (``C_q^½ C_k^½ = U Σ Vᵀ``) gives new query rows ``Σ^½ Uᵀ C_q^{-½}`` (q's space) and key
  rows ``Σ^½ Vᵀ C_k^{-½}``, both linear maps of the original q and k, biases included.
- ``vo``: each head's value and output projections form ``W_o,h W_v,h``; in the metric of
  the output projection's input (the attention-mixed values, whose Gram matrix the
  calibration already has), ``W_o,h G_h^½ = U Σ Vᵀ`` gives the new output columns ``U``
  and the new value rows ``Σ Vᵀ G_h^{-½}`` (again maps of the original v).
- ``mlp``: a neuron of ``fc1`` feeds ``fc2`` through an element-wise activation, so
  keeping a subset S of neurons keeps ``fc1``'s rows S unchanged; ``fc2`` is refitted on
  them by least squares over the calibration activations (Nyström:
  ``W₂' = W₂ C_{:,S} C_{S,S}⁻¹``, with its bias corrected for the mean), and S is chosen
  greedily by the output error each neuron removes (a pivoted Cholesky of ``C``).

Each layer of a pair gets one of two *forms* (`mixrank.compress.factor.forms`):

- ``rows``: only r output rows are computed (``y = scatter(B x)``, B (r, n)); the other
  outputs are the original bias (their contribution is constant: a zero query or key
  component adds the same number to every logit of a row; a pruned value or neuron is
  never read by its partner).
- ``cols``: only r input columns are read (``y = A x[idx]``, A (m, r)).

Both are a low-rank pair whose other factor is a selection, stored as an index: the
rank search, the refinements, the factors file and the rewriter treat them like any
factored layer. Rules that find pairs in a model are registered in `PAIRINGS`.
"""

from ._attention import qk_spectra, vo_spectra
from ._base import PAIRINGS, Pair, Pairing, find_pairs, is_linear
from ._bert import BertPairing
from ._mlp import mlp_spectra
from ._spectrum import SPECTRA, PairedSpectrum, PairForm, pair_forms, pair_spectra
from ._timm import TimmMlpPairing
