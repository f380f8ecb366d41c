import pytest
import torch

from mixrank.compress import activation_error, plain_spectrum, whitened_spectrum


def _problem(m=48, n=40, tokens=300, seed=0):
    """A weight and a Gram matrix of correlated inputs with a few outlier channels,
    like ViT activations."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.linspace(2, 0.05, n)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix
    X[:, :3] *= 20  # outlier channels
    return W, X.T @ X


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_damped_error_equals_discarded_singular_values(seed):
    W, G = _problem(seed=seed)
    spec = whitened_spectrum(W.float(), G, damping=1e-2)
    lam = 1e-2 * float(torch.diagonal(G).mean())
    Gd = G + lam * torch.eye(G.shape[0], dtype=G.dtype)
    for r in (1, 5, 17, 39, 40):
        A, B = spec.factors(r)
        measured = activation_error(W, A.double() @ B.double(), Gd)
        expected = float((spec.sigma[r:] ** 2).sum())
        assert measured == pytest.approx(expected, rel=1e-4, abs=1e-6 * spec.ref)
        assert float(spec.err_damped[r]) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_undamped_error_curve_is_exact(seed):
    W, G = _problem(seed=seed)
    spec = whitened_spectrum(W.float(), G, damping=1e-2)
    for r in (2, 10, 30):
        A, B = spec.factors(r)
        measured = activation_error(W, A.double() @ B.double(), G)
        assert float(spec.err[r]) == pytest.approx(measured, rel=1e-4)
        assert spec.nmse(r) == pytest.approx(measured / spec.ref, rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_activation_aware_never_worse_than_plain_svd(seed):
    W, G = _problem(seed=seed)
    aware = whitened_spectrum(W.float(), G, damping=1e-6)
    plain = plain_spectrum(W.float(), G)
    for r in range(1, 40, 3):
        Aa, Ba = aware.factors(r)
        Ap, Bp = plain.factors(r)
        e_aware = activation_error(W, Aa.double() @ Ba.double(), G)
        e_plain = activation_error(W, Ap.double() @ Bp.double(), G)
        assert e_aware <= e_plain * (1 + 1e-5) + 1e-9 * aware.ref
        assert float(plain.err[r]) == pytest.approx(e_plain, rel=1e-4)
    # and by a wide margin at low rank, where outlier channels matter
    A, B = aware.factors(5)
    Ap, Bp = plain.factors(5)
    assert activation_error(W, A.double() @ B.double(), G) < 0.5 * activation_error(
        W, Ap.double() @ Bp.double(), G)


def test_rank_deficient_gram_is_handled():
    W, _ = _problem()
    X = torch.randn(10, 40, dtype=torch.float64)  # 10 tokens < 40 channels: singular G
    spec = whitened_spectrum(W.float(), X.T @ X, damping=1e-2)
    assert torch.isfinite(spec.us).all() and torch.isfinite(spec.vt).all()
    assert spec.nmse(10) < 1e-2  # the data spans 10 directions only
