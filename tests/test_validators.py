"""The three validators every user input goes through (issue 27), fed generated garbage in
process: the numbers and settings of a configuration (`CompressConfig`, `job_config` and
its TOML file), the bounded-depth JSON and TOML readers (reports, limits, configurations),
and the factors file's validation (`load_factors`, over a plan and tensors a forger wrote,
with the digest recomputed). Each answers with a result or a `MixrankError`, never another
exception."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixrank.core import MAX_DEPTH, MixrankError

# MIXRANK_FUZZ_EXAMPLES=2000 for a longer hunt; CI runs 60 of each, the same ones every time
SETTINGS = settings(max_examples=int(os.environ.get("MIXRANK_FUZZ_EXAMPLES", "60")), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["0.12x", "1e999x", "nanx", "-0.1x", "auto", "int3", "svd", "²", "\x00", "4GB", "-1GB"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
FIELDS = ["keep", "params", "bytes", "precision", "method", "seed", "max_seconds", "max_memory", "effort", "damping",
          "holdout", "block", "structure", "device", "rank_step", "min_rank", "evals", "distill_steps",
          "distill_lr", "widths", "forms", "grid", "scheme", "quantizer", "include", "overrides", "role_scales",
          "sparse", "budget", "search", "refine", "quantize", "selection", "metric", "token_mask", "kep"]


def _answers(fn):
    """``fn()``'s result, or ``None`` for a `MixrankError`; any other exception fails."""
    try:
        return fn()
    except MixrankError as e:
        assert str(e) and "\n" not in str(e).strip(), repr(e)
        return None


@SETTINGS
@given(settings_=st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=3))
def test_a_configuration_of_garbage_is_taken_or_refused(settings_):
    from mixrank.compress import CompressConfig, job_config

    cfg = _answers(lambda: CompressConfig(**settings_))
    if cfg is not None:  # what is taken is a configuration that reads back as itself
        assert CompressConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    _answers(lambda: job_config(settings_))


def _toml_value(v) -> str:
    """``v`` written as TOML (what a user could type), or as raw text for what TOML cannot hold."""
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


@SETTINGS
@given(entries=st.dictionaries(st.sampled_from(FIELDS + ["max_param_ratio", "min_cosine", "min_speedup"]), VALUES,
                               max_size=4),
       junk=st.sampled_from(["", "[budget\n", "x = = 1\n", "a = " + "[" * 5000 + "]" * 5000 + "\n",
                             "[[[[x]]]]\n", "\x00\n", "k = '''\n", "[search]\nevals = -1\n"]))
def test_toml_files_of_garbage_are_read_or_refused(tmp_path, entries, junk):
    from mixrank.compress import job_config
    from mixrank.engines import load_limits

    text = "".join(f"{k} = {_toml_value(v)}\n" for k, v in entries.items()) + junk
    path = tmp_path / "g.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _answers(lambda: load_limits(path))
    _answers(lambda: job_config({}, path))


def _nested(depth: int, leaf) -> object:
    out = leaf
    for i in range(depth):
        out = [out] if i % 2 else {"k": out}
    return out


@SETTINGS
@given(body=st.one_of(VALUES, st.builds(_nested, st.integers(0, 3 * MAX_DEPTH), VALUES)),
       raw=st.sampled_from(["", "{", "[" * 100000, "NaN", '{"schema_version": 1, "summary": ' + "[" * 3000,
                            "\ufeff{}", "null"]))
def test_reports_of_garbage_are_read_or_refused(tmp_path, body, raw):
    from mixrank.engines import check_report, load_limits, read_report

    (tmp_path / "l.toml").write_text("max_param_ratio = 0.5\nmin_speedup = { 32 = 1.0 }\n")
    limits = load_limits(tmp_path / "l.toml")
    for text in (json.dumps({"schema_version": 1, "summary": body}), json.dumps(body), raw):
        p = tmp_path / "r.json"
        p.write_text(text)
        rep = _answers(lambda p=p: read_report(p))
        if rep is not None:
            verdict = _answers(lambda rep=rep: check_report(rep, limits))
            assert verdict is None or verdict["exit_code"] in (0, 1, 3)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()


LAYER_FIELDS = st.fixed_dictionaries(
    {}, optional={"shape": VALUES, "rank": VALUES, "dense": VALUES, "precision": VALUES, "form": VALUES,
                  "block": VALUES, "pair": VALUES, "residual_precision": VALUES, "residual_block": VALUES,
                  "sparse": VALUES, "nmse": VALUES, "sha256": VALUES, "bias_delta": VALUES})
TENSORS = st.dictionaries(
    st.sampled_from(["0.A", "0.B", "0.W", "0.index", "0.sparse_index", "0.sparse_value", "0.A.codes", "0.A.scale",
                     "0.B.codes", "0.bias_delta", "2.A", "2.B"]),
    st.tuples(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.int32, torch.bool]),
              st.lists(st.integers(0, 33), min_size=0, max_size=3),
              st.sampled_from([0.0, 1.0, math.nan, math.inf, -7.0])),
    max_size=4)


@SETTINGS
@given(layers=st.dictionaries(st.sampled_from(["0", "2", "nope", ""]), st.one_of(LAYER_FIELDS, VALUES),
                              max_size=2),
       tensors=TENSORS, version=st.sampled_from([1, 2, 3, 4, 5, True, 99, "4", None]),
       extra=st.dictionaries(st.sampled_from(["method", "budget", "allocation", "totals", "config", "limits"]),
                             VALUES, max_size=2))
def test_factors_files_of_garbage_are_loaded_or_refused(tmp_path, layers, tensors, version, extra):
    from safetensors.torch import save_file

    from mixrank.compress import apply_factors, load_factors
    from mixrank.compress.artifact._factors import DIGEST_KEY, PLAN_KEY, _digest

    model = _mlp()
    ts = {}
    for name, (dtype, shape, fill) in tensors.items():
        t = torch.full(shape, fill) if dtype.is_floating_point else torch.zeros(shape)
        ts[name] = t.to(dtype).contiguous()
    plan = json.dumps({"format_version": version, "layers": layers, **extra}, sort_keys=True)
    path = tmp_path / "g.safetensors"
    save_file(ts, str(path), metadata={PLAN_KEY: plan, DIGEST_KEY: _digest(plan, ts)})
    factors = _answers(lambda: load_factors(path))
    if factors is not None:  # what loads applies, and computes finite outputs
        small = _answers(lambda: apply_factors(model, factors))
        if small is not None:
            with torch.no_grad():
                assert torch.isfinite(small(torch.randn(3, 16))).all()


def test_the_depth_bound_is_one_line_for_each_reader(tmp_path):
    from mixrank.compress import job_config
    from mixrank.core import loads_json, read_toml
    from mixrank.engines import read_report

    deep = "[" * 50000 + "]" * 50000
    (tmp_path / "d.json").write_text('{"schema_version": 1, "summary": ' + deep + "}")
    (tmp_path / "d.toml").write_text("keep = " + deep + "\n")
    (tmp_path / "ok.toml").write_text("keep = " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n")  # + the table
    for fn in (lambda: read_report(tmp_path / "d.json"), lambda: read_toml(tmp_path / "d.toml"),
               lambda: job_config({}, tmp_path / "d.toml"), lambda: loads_json(deep, "x")):
        with pytest.raises(MixrankError, match=f"more than {MAX_DEPTH} levels deep"):
            fn()
    assert read_toml(tmp_path / "ok.toml")  # at the bound: read (and then refused as a setting, not here)
    assert Path(tmp_path / "ok.toml").is_file()
