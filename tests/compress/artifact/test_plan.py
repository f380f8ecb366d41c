"""The typed plan: attribute access for readers, the JSON form for files, and files
written by earlier versions (format 1, checked in) still load and apply."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mixrank.compress import FORMAT_VERSION, MixrankError, Plan, apply_factors, load_factors

DATA = Path(__file__).resolve().parents[2] / "data"


def test_format_1_file_loads_and_applies(tiny_vit):
    """``v1_factors_tiny_vit.safetensors`` was written by mixrank at commit 2876fb6 (format 1,
    flat config) from the conftest ``tiny_vit`` with row-sparse factors; the expected output
    is that version's factored model on ``torch.randn`` inputs of seed 0."""
    f = load_factors(DATA / "v1_factors_tiny_vit.safetensors")
    assert f.plan.format_version == FORMAT_VERSION and f.plan["upgraded_from"] == 1
    assert f.plan.config["budget"]["keep"] == 0.5 and f.plan.config["refine"]["sparse"] == "row"
    info = f.layers["blocks.0.mlp.fc1"]
    assert info.sparse.structure == "row" and info.sparse.k == 3 and info.rank >= 8
    small = apply_factors(tiny_vit, f).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))[:2]
    with torch.no_grad():
        got = small(x).numpy()
    np.testing.assert_allclose(got, np.load(DATA / "v1_factors_tiny_vit.expected.npy"), rtol=1e-5, atol=1e-6)


def test_typed_and_json_views_agree():
    p = Plan.read({"format_version": FORMAT_VERSION, "method": "whiten",
                   "layers": {"a": {"shape": [4, 6], "rank": 2, "sha256": "x" * 64}},
                   "a_key_from_a_newer_writer": [1, 2]})
    a = p.layers["a"]
    assert a.rank == 2 and a["rank"] == 2 and not a.dense and a.sparse.structure == "none"
    assert p["a_key_from_a_newer_writer"] == [1, 2]  # kept, not dropped
    p.layers["b"] = {"shape": [3, 3], "dense": True}  # a plain dict is read as a LayerPlan
    assert p.layers["b"].dense and p.factored_layers() == ["a"]
    assert Plan.read(json.loads(json.dumps(p))) == p


@pytest.mark.parametrize("version", [0, 5, None])
def test_unknown_versions_are_refused(version):
    with pytest.raises(MixrankError, match="factors format version"):
        Plan.read({"format_version": version})
