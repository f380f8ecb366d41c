"""The structured configuration: sections, flat names, the method check, TOML files and
the command line's --config with flags on top."""

import json
import subprocess
import sys

import pytest

from mixrank.compress import Budget, CompressConfig, MixrankError, Search


def test_flat_names_land_in_their_sections():
    cfg = CompressConfig(keep=0.3, search_evals=40, sparse="row", rank_step=4, seed=3)
    assert cfg.budget == Budget(keep=0.3) and cfg.search.evals == 40 and cfg.refine.sparse == "row"
    assert cfg.selection.rank_step == 4 and cfg.seed == 3
    assert CompressConfig(budget=Budget(params=1000), search=Search(evals=7)).budget_params(10_000) == 1000


def test_round_trip_nested_and_flat():
    cfg = CompressConfig(keep=0.3, overrides={"a": {"rank": 8}}, distill_steps=5)
    d = cfg.to_dict()
    assert set(d) >= {"budget", "selection", "search", "refine", "method", "metric"}
    assert CompressConfig.from_dict(d) == cfg
    assert CompressConfig.from_dict(json.loads(json.dumps(d))) == cfg
    flat = {"method": "mixrank", "keep": 0.3, "overrides": {"a": {"rank": 8}}, "distill_steps": 5,
            "format_version": 1}  # a format-1 plan stored its config flat, with a format version
    assert CompressConfig.from_dict(flat) == cfg


@pytest.mark.parametrize("method, setting, value", [
    ("whiten", "search_evals", 40), ("svd", "distill_steps", 10), ("asvd", "sparse", "row"),
    ("svd", "damping", 0.1), ("oats", "sequential", False),
])
def test_a_setting_the_method_ignores_is_an_error_that_names_it(method, setting, value):
    with pytest.raises(MixrankError, match=rf"{setting}={value!r} is ignored by method '{method}'"):
        CompressConfig(method=method, **{setting: value})


def test_settings_every_method_reads_are_accepted():
    for method in ("mixrank", "whiten", "svd", "asvd", "oats"):
        CompressConfig(method=method, keep=0.3, include=["blocks.*"], metric="kl", holdout=0.25, seed=1,
                       search_samples=64)
    CompressConfig(method="whiten", damping=0.1)  # the whitened closed form reads it


@pytest.mark.parametrize("kwargs, match", [
    ({"kep": 0.3}, r"unknown setting 'kep' \(did you mean: keep"),
    ({"budget": {"keep": 0.3, "bytes": 10}}, "give one budget"),
    ({"search": {"rounds": -1}}, "search_rounds must be >= 0"),
    ({"selection": {"rank_step": 0}}, "rank_step must be >= 1"),
    ({"refine": {"distill_lr": 0}}, "distill_lr must be > 0"),
    ({"holdout": 1.0}, r"holdout must be a fraction in \(0, 1\)"),
])
def test_sections_validate_themselves(kwargs, match):
    with pytest.raises(MixrankError, match=match):
        CompressConfig(**kwargs)


def test_toml_file_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('method = "mixrank"\nseed = 2\n[budget]\nparams = 5000\n[search]\nevals = 30\n'
                 '[selection.overrides."blocks.0.attn.qkv"]\ndense = true\n')
    cfg = CompressConfig.from_toml(p)
    assert cfg.budget.params == 5000 and cfg.search.evals == 30 and cfg.seed == 2
    assert cfg.selection.overrides == {"blocks.0.attn.qkv": {"dense": True}}
    over = CompressConfig.from_toml(p, {"keep": 0.3, "search_evals": 12})
    assert over.budget.keep == 0.3 and over.budget.params is None and over.search.evals == 12
    p.write_text('method = "whiten"\n[search]\nevals = 30\n')
    with pytest.raises(MixrankError, match=r"c\.toml: setting search_evals=30 is ignored by method 'whiten'"):
        CompressConfig.from_toml(p)
    p.write_text("[budget\nkeep = 0.3\n")
    with pytest.raises(MixrankError, match=r"c\.toml: not valid TOML"):
        CompressConfig.from_toml(p)


def _mixrank(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mixrank", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_cli_config_file_with_flags_on_top(tmp_path, digits):
    (tmp_path / "c.toml").write_text('method = "whiten"\n[budget]\nkeep = 0.5\n')
    out = _mixrank("compress", "--config", "c.toml", "--keep", "0.3", "--calib-images", "128", "-q",
                   "-o", "f.safetensors", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    from mixrank.compress import load_factors

    plan = load_factors(tmp_path / "f.safetensors").plan
    assert plan.method == "whiten" and plan.budget.keep == 0.3  # the file's method, the flag's budget
    assert plan.config["budget"]["keep"] == 0.3 and plan.config["method"] == "whiten"
    (tmp_path / "bad.toml").write_text('method = "whiten"\n[refine]\ndistill_steps = 10\n')
    bad = _mixrank("compress", "--config", "bad.toml", "-o", "g.safetensors", cwd=tmp_path)
    assert bad.returncode == 2 and "bad.toml: setting distill_steps=10 is ignored" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "g.safetensors").exists()
