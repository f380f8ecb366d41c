"""Factorization: each layer's closed form and the fits built from it.

- spectra: the activation-aware closed form (`whitened_spectrum`, one SVD for the whole
  error-versus-rank curve) and plain SVD;
- `LayerFit`: a layer's factors at an allocated rank, with `fit_layer` for low rank plus
  a sparse term;
- `FACTORIZERS`: whiten, svd, asvd, oats;
- `forms`: how a factored layer computes (`FORMS`: lowrank, rows, cols);
- `sparse`: the sparse term's structures (`SPARSE`: channel, row);
- `pairs`: layers compressed as one product (query-key, value-output, MLP).
"""

from . import forms, pairs, sparse
from ._factorizers import ASVD, FACTORIZERS, OATS, Factorizer, PlainSVD, Whiten, asvd_spectrum, oats_fit
from ._fit import LayerFit, closed_form_fit, fit_layer, nmse
from ._residual import ResidualBank, ResidualSpectrum, fit_residual
from ._spectrum import Spectrum, activation_error, damped_sqrt, plain_spectrum, ridge_toward, whitened_spectrum
from .forms import FORMS, EmitContext, LayerForm, form_of
from .pairs import PAIRINGS, Pair, PairedSpectrum, PairForm, find_pairs, pair_forms, pair_spectra
from .sparse import SPARSE, SparseStructure, SparseTerm, fit_sparse, largest_k, sparse_cost
