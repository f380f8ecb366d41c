"""Extension points: a new sparse structure is one class plus its registration, and it
goes through compression, the factored model, the ONNX rewrite and onnxruntime; the
guarded step keeps a refinement only when it wins on held-out data."""

import numpy as np
import pytest
import torch

from mixrank.compress import SPARSE, CompressConfig, MixrankError, SparseStructure, apply_factors, compress_model
from mixrank.compress.factor.sparse import damped
from mixrank.compress.refine import REFINEMENTS, Outcome, RefineContext, Refinement, run_refinements
from mixrank.exporter import export_onnx, rewrite_onnx, run_onnxruntime


class LeadingColumns(SparseStructure):
    """The first k input columns (a fixed support): everything a structure must say."""

    def index_count(self, k, m):
        return k

    def support(self, R, G, k):
        return torch.arange(k)

    def fit_values(self, index, R, G, lam):
        return torch.linalg.solve(damped(G[index][:, index], lam), (R @ G[:, index]).T).T

    def dense(self, index, value, n):
        S = value.new_zeros(value.shape[0], n)
        S[:, index] = value
        return S

    def apply(self, x, index, value):
        return torch.nn.functional.linear(x[..., index], value)

    def emit_onnx(self, x, index, value, dtype, base, const_name, out_dtype):
        import onnx_graphsurgeon as gs

        gi = gs.Constant(const_name("sparse_index"), index.astype(np.int64))
        sv = gs.Constant(const_name("sparse_value_t"), np.ascontiguousarray(value.T.astype(dtype)))
        g, sp = gs.Variable(f"{base}/lead", dtype=out_dtype), gs.Variable(f"{base}/lead_mm", dtype=out_dtype)
        return ([gs.Node("Gather", f"{base}/lead", {"axis": -1}, [x, gi], [g]),
                 gs.Node("MatMul", f"{base}/lead_mm", {}, [g, sv], [sp])], sp, sv.values.size)


@pytest.fixture
def leading():
    SPARSE.add("leading", LeadingColumns())
    yield
    SPARSE.remove("leading")


def test_a_registered_sparse_structure_runs_end_to_end(tiny_vit, leading, tmp_path):
    calib = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    cfg = CompressConfig(keep=0.5, sparse="leading", search_evals=10, compensate_steps=10, block_steps=0,
                         distill_steps=0, overrides={"blocks.0.mlp.fc1": {"sparse_k": 4}})
    f = compress_model(tiny_vit, calib, cfg, progress=False)
    info = f.layers["blocks.0.mlp.fc1"]
    assert info.sparse.structure == "leading" and info.sparse.k == 4
    assert torch.equal(f.tensors["blocks.0.mlp.fc1.sparse_index"], torch.arange(4, dtype=torch.int32))
    small = apply_factors(tiny_vit, f).eval()
    export_onnx(tiny_vit, calib[0][:2], tmp_path / "o.onnx")
    rewrite_onnx(tmp_path / "o.onnx", f, tmp_path / "c.onnx")
    x = calib[1]
    with torch.no_grad():
        ref = small(x).numpy()
    got = run_onnxruntime(tmp_path / "c.onnx", {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_an_unregistered_structure_is_a_clear_error():
    with pytest.raises(MixrankError, match="unknown sparse structure 'leading'"):
        CompressConfig(sparse="leading")


def test_the_guarded_step_keeps_only_what_wins():
    """Proposals scored 2.0, 0.5 and 0.5 against a closed form at 1.0: the worse one and
    the tie are recorded and rejected."""
    ctx = RefineContext(None, CompressConfig(), None, {}, {}, {}, {}, [], lambda fits: fits["a"], [])

    class Fixed(Refinement):
        def __init__(self, name, value):
            self.tag, self.value = name, value

        def run(self, ctx, fits, chosen):
            return Outcome(f"{chosen}+{self.tag}", {"a": self.value})

    REFINEMENTS.add("worse", Fixed("worse", 2.0))
    REFINEMENTS.add("better", Fixed("better", 0.5))
    REFINEMENTS.add("tie", Fixed("tie", 0.5))
    try:
        chosen, name, score_, variants = run_refinements(ctx, {"a": 1.0}, "closed_form", 1.0,
                                                         ("worse", "better", "tie"))
    finally:
        for n in ("worse", "better", "tie"):
            REFINEMENTS.remove(n)
    assert [v["name"] for v in variants] == ["closed_form", "closed_form+worse", "closed_form+better",
                                             "closed_form+better+tie"]
    assert name == "closed_form+better" and score_ == 0.5 and chosen == {"a": 0.5}
