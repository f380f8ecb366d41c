"""`CompressConfig`: what to compress, to which budget, and how.

A configuration has general settings (method, effort, metric, damping, holdout,
token_mask, device, seed, max_seconds, max_memory) and five sections
(`mixrank.compress._sections`):

- `Budget`: how much the selected layers may keep.
- `Selection`: which layers, the per-layer overrides, and the rank grid.
- `Search`: the end-to-end allocation search (method ``mixrank``).
- `Refine`: the refinements after the closed form (method ``mixrank``).
- `Quantize`: how weights are stored (precision, block, quantizer, split, scheme).

Each section validates itself. The configuration as a whole is checked against the
method: a setting that the method's components never read is an error that names it
(each component declares what it reads, `check_settings`). Flat keyword arguments are
accepted and routed to their section (``CompressConfig(keep=0.4, search_evals=40)`` is
``CompressConfig(budget=Budget(keep=0.4), search=Search(evals=40))``), and so are flat
dicts (factors files of format 1). TOML files use the sections as tables
(docs/design.md, "Configuration"). `job_config` is the configuration of a compression
job as the command line takes it, with its defaults.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

import torch

from mixrank.core import MixrankError, close_matches, is_number, read_toml

from ._defaults import JOB_BYTES
from ._methods import METHODS, Method
from ._sections import (
    DTYPE_PRECISION,
    FLAT,
    SECTIONS,
    Budget,
    Quantize,
    Refine,
    Search,
    Selection,
    check_fraction,
    check_seconds,
    flat_name,
    parse_memory,
)
from .factor import FACTORIZERS

METRICS = ("auto", "kl", "mse", "cosine")
GENERAL = ("method", "effort", "metric", "damping", "holdout", "token_mask", "device", "seed", "max_seconds",
           "max_memory")
# Effort presets (like compression levels): what each fills in, for the settings the user
# left unset and the method reads. The measured time and error of each: README, "Effort".
EFFORTS: dict[str, dict[str, Any]] = {
    "fast": {"search_rounds": 1, "search_evals": 40, "search_groups": 1, "search_role_scales": (),
             "search_forms": ("dense", "lowrank"), "compensate_steps": 0, "sequential": False, "distill_steps": 0},
    "balanced": {"search_rounds": 3, "search_evals": 120, "search_groups": 3, "compensate_steps": 0,
                 "sequential": False, "block_steps": 0, "distill_steps": 230,
                 "distill_work": 10_500_000_000_000},
    "best": {"search_rounds": 6, "search_evals": 200, "compensate_steps": 200, "sequential": True,
             "block_steps": 300, "distill_steps": 300},
}


def _check_device(device) -> None:
    """A device this machine has: ``None``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    if device is None:
        return
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise MixrankError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise MixrankError(f"device {device!r} asked for, but this machine has no usable CUDA GPU "
                               f"(torch {torch.__version__}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise MixrankError(f"device {device!r} asked for, but this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s)")
    elif d.type != "cpu":
        raise MixrankError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")


class CompressConfig:
    """How to compress a model: general settings plus the `Budget`, `Selection`,
    `Search`, `Refine` and `Quantize` sections.

    Args:
        method: a registered method (``"mixrank"``, ``"whiten"``, ``"svd"``, ``"asvd"``,
            ``"oats"``; see `mixrank.compress.METHODS`).
        effort: ``"fast"`` (the closed form and a cheap allocation), ``"balanced"`` (the
            default) or ``"best"`` (every refinement at full length): a preset for the
            search and refinement settings left unset (`EFFORTS`).
        max_seconds: a wall-clock cap on the whole compression (``None``: none). Without
            one every bound counts work, so results do not depend on the machine's speed
            or load; with one, the plan records the stages it stopped.
        max_memory: bytes (or a size such as ``"4GB"``) the calibration Gram matrices
            may hold in memory; the largest beyond it are accumulated in memory-mapped
            files instead (``MIXRANK_SPILL_DIR``; the results do not change). ``None``:
            all in memory.
        metric: end-to-end output error that scores allocations and refinements:
            ``"kl"`` (logits), ``"mse"`` (normalised), ``"cosine"`` (1 − cosine) or
            ``"auto"`` (normalised MSE; docs/design.md, "Scoring" says why).
        damping: ``λ = damping · mean(diag G)`` added to the Gram matrix.
        holdout: fraction of the calibration batches held out to score allocations and
            refinements end to end (never used for statistics or distillation steps;
            docs/design.md, "Scoring").
        token_mask: key of a dict batch holding a (batch, tokens) mask of the tokens to
            count (for example ``"attention_mask"``); ``None`` counts all.
        device: torch device for statistics and factorization (``None``: the model's).
        seed: seed for anything random.
        budget, selection, search, refine, quantize: the sections, each a section object
            or a dict of its fields (``None``: defaults).
        **flat: section fields by flat name (``keep=0.4``, ``search_evals=40``,
            ``sparse="row"``, ...), routed to their section.

    Raises:
        MixrankError: an unknown or malformed setting, or one the method ignores.
    """

    def __init__(self, method: str = "mixrank", *, effort: str | None = None, metric: str = "auto",
                 damping: float = 1e-2, holdout: float = 0.25, token_mask: str | None = None,
                 device: str | None = None, seed: int = 0, max_seconds: float | None = None,
                 max_memory: int | str | None = None,
                 budget: Budget | dict | None = None,
                 selection: Selection | dict | None = None, search: Search | dict | None = None,
                 refine: Refine | dict | None = None, quantize: Quantize | dict | None = None, **flat: Any):
        self.method = method
        effort = "balanced" if effort is None else effort  # None means the default
        self.effort = effort
        self.max_seconds = max_seconds
        self.max_memory = parse_memory(max_memory)
        self.metric = metric
        self.damping = damping
        self.holdout = holdout
        self.token_mask = token_mask
        self.device = device
        self.seed = seed
        given = {"budget": budget, "selection": selection, "search": search, "refine": refine,
                 "quantize": quantize}
        parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for s, v in given.items():
            if isinstance(v, dict):
                parts[s].update(v)
            elif v is not None:
                if not isinstance(v, SECTIONS[s]):
                    raise MixrankError(f"{s} must be a {SECTIONS[s].__name__} or a dict")
                parts[s].update(dataclasses.asdict(v))
        for key, value in flat.items():
            if key not in FLAT:
                raise MixrankError(f"unknown setting {key!r}{close_matches(key, [*FLAT, *GENERAL])}")
            s, name = FLAT[key]
            parts[s][name] = value
        self._fill_effort(effort, parts)
        for s, cls in SECTIONS.items():
            known = {f.name for f in dataclasses.fields(cls)}
            bad = set(parts[s]) - known
            if bad:
                raise MixrankError(f"unknown [{s}] setting(s) {sorted(bad)}; known: {sorted(known)}")
            setattr(self, s, cls(**parts[s]))
        self._default_precision()
        self._validate()

    def _default_precision(self) -> None:
        """A bytes budget with no precision given (nor the deprecated dtype) chooses the
        precision per layer (``auto``), as the command line does — for a method whose
        factors are its closed form and without a sparse term (both stored in floating
        point, which ``auto`` does not mix with integers)."""
        q, b = self.quantize, self.budget
        if b.bytes is None or q.precision is not None or b.dtype != "float32" or self.refine.sparse != "none":
            return
        if FACTORIZERS[METHODS[self.method].factorizer].closed_form:
            q.precision = "auto"

    def _fill_effort(self, effort: str, parts: dict[str, dict[str, Any]]) -> None:
        """Fill in the preset's settings that the user left unset and the method reads."""
        if not isinstance(effort, str) or effort not in EFFORTS:
            raise MixrankError(f"unknown effort {effort!r}; choose one of {', '.join(EFFORTS)}"
                               f"{close_matches(str(effort), EFFORTS)}")
        reads = METHODS[self.method].settings()
        for flat, value in EFFORTS[effort].items():
            s, name = FLAT[flat]
            key = f"{s}.{name}"
            if s in ("search", "refine") and key not in reads:
                continue
            parts[s].setdefault(name, value)

    # ------------------------------------------------------------------ checks

    def _validate(self) -> None:
        method = METHODS[self.method]
        if not isinstance(self.metric, str) or self.metric not in METRICS:
            raise MixrankError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if not (is_number(self.damping) and self.damping >= 0):
            raise MixrankError(f"damping must be a number >= 0, got {self.damping!r}")
        check_fraction("holdout", self.holdout)
        _check_device(self.device)
        check_seconds("max_seconds", self.max_seconds)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise MixrankError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.token_mask is not None and not isinstance(self.token_mask, str):
            raise MixrankError(f"token_mask must be a key name, got {self.token_mask!r}")
        if self.refine.sparse == "none" and any(ov.get("sparse_k") for ov in self.selection.overrides.values()):
            raise MixrankError("a sparse_k override needs sparse='channel' or sparse='row'")
        q = self.quantize
        if q.precision is not None and self.budget.dtype != "float32":
            raise MixrankError(f"give precision={q.precision!r} or dtype={self.budget.dtype!r}, not both "
                               "(dtype is deprecated: precision is the storage precision)")
        if self.budget.dtype == "bfloat16":
            raise MixrankError("bfloat16 storage is not exported by any engine here; use precision='fp16'")
        if q.precision == "auto" and self.budget.bytes is None:
            raise MixrankError("precision='auto' chooses precision per layer under a bytes budget; give "
                               "bytes= (on the command line --bytes, e.g. --bytes 0.12x)")
        if self.selection.structure not in (None, "lowrank") and not method.pairs:
            users = [m for m in METHODS if METHODS[m].pairs]
            raise MixrankError(f"structure={self.selection.structure!r} is ignored by method {self.method!r}, which "
                               f"factors every layer on its own; pairwise forms are read by method "
                               f"{', '.join(users)}")
        if self.refine.sparse != "none" and self.precision in ("int8", "int4", "int2", "auto"):
            raise MixrankError(f"a sparse term is stored in floating point; it does not combine with "
                               f"precision {self.precision!r} (use sparse='none')")
        check_settings(self, method)

    # ------------------------------------------------------------------ views

    @property
    def structure(self) -> str:
        """``selection.structure``, with ``None`` resolved for the method."""
        if self.selection.structure is not None:
            return self.selection.structure
        return "auto" if METHODS[self.method].pairs else "lowrank"

    @property
    def precision(self) -> str:
        """The storage precision of the compressed layers (``"auto"``: chosen per layer):
        ``quantize.precision``, else the one the deprecated ``budget.dtype`` stands for."""
        return self.quantize.precision or DTYPE_PRECISION[self.budget.dtype]

    def budget_params(self, total_params: int) -> int:
        """The parameter budget of the selected layers, given their dense total
        (`Budget.params_for`)."""
        return self.budget.params_for(total_params)

    def to_dict(self) -> dict[str, Any]:
        """Nested dict: the general settings, then one dict per section."""
        d: dict[str, Any] = {k: getattr(self, k) for k in GENERAL}
        for s in SECTIONS:
            d[s] = dataclasses.asdict(getattr(self, s))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressConfig:
        """The inverse of `to_dict`; flat keys (format-1 factors files) are accepted too,
        and ``format_version`` (which format 1 stored here) is ignored."""
        if not isinstance(d, dict):
            raise MixrankError(f"a configuration must be a table, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if k != "format_version"}
        check_sections(d)
        general = {k: d.pop(k) for k in GENERAL if k in d}
        sections = {s: d.pop(s) for s in SECTIONS if s in d and isinstance(d[s], dict)}
        unknown = [k for k in d if k not in FLAT]
        if unknown:
            raise MixrankError(f"unknown config key(s) {sorted(unknown)}"
                               f"{close_matches(unknown[0], [*FLAT, *GENERAL, *SECTIONS])}")
        return cls(**general, **sections, **d)

    @classmethod
    def from_toml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> CompressConfig:
        """Read a TOML configuration (general keys at the top, sections as tables), with
        ``overrides`` (flat or general names, e.g. from the command line) on top.

        Raises:
            MixrankError: the file cannot be read, or a setting in it is wrong (the
                message names the file).
        """
        raw = read_toml(path)
        merged = merge_settings(raw, overrides or {})
        try:
            return cls.from_dict(merged)
        except MixrankError as e:
            raise MixrankError(f"{path}: {e}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"CompressConfig({self.to_dict()!r})"


def check_sections(d: dict[str, Any]) -> None:
    """Every section of a configuration is a table.

    Raises:
        MixrankError: names the section and what it was given.
    """
    for s in SECTIONS:
        if s in d and not isinstance(d[s], dict):
            raise MixrankError(f"[{s}] is a section of settings (a table), got {d[s]!r}")


def merge_settings(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` (nested or flat) with ``changes`` (general or flat names) on top. A budget
    given in ``changes`` replaces the base's budget kind (``keep`` drops ``params``)."""
    out = {k: (dict(v) if isinstance(v, dict) and k in SECTIONS else v) for k, v in base.items()}
    for key, value in changes.items():
        if key in GENERAL:
            out[key] = value
            continue
        if key not in FLAT:
            raise MixrankError(f"unknown setting {key!r}{close_matches(key, [*FLAT, *GENERAL])}")
        s, name = FLAT[key]
        sec = out.setdefault(s, {})
        if not isinstance(sec, dict):
            raise MixrankError(f"[{s}] must be a table")
        for flat_key in list(out):  # a flat copy of the same setting in the base loses
            if FLAT.get(flat_key) == (s, name):
                del out[flat_key]
        if s == "budget" and name in ("keep", "params", "bytes"):
            for other in ("keep", "params", "bytes"):
                sec.pop(other, None)
                out.pop(other, None)
        sec[name] = value
    return out


def job_config(flags: dict[str, Any] | None = None, config_file: str | os.PathLike | None = None,
               tensorrt: bool = False) -> CompressConfig:
    """The configuration of a compression job as the command line takes it: the TOML file
    ``config_file`` with ``flags`` (flat or general names) on top, and the job's defaults
    for what neither gives:

    - no budget: ``bytes=JOB_BYTES`` (12 % of the model's float32 weight bytes);
    - a bytes budget and no precision (nor the deprecated dtype): ``precision="auto"``;
    - ``tensorrt`` (the artifact is for TensorRT) and no scheme: ``scheme="symmetric"``
      (TensorRT's DequantizeLinear takes no zero points), and no widths: int8 and int4
      (TensorRT dequantizes no int2).

    Raises:
        MixrankError: both ``keep`` and ``bytes`` in ``flags``, an unreadable file, or a
            wrong setting (named with the file when the file alone is wrong).
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    given_budgets = [k for k in ("keep", "params", "bytes") if k in flags]
    if len(given_budgets) > 1:
        raise MixrankError(f"give one budget: {' or '.join('--' + k for k in given_budgets)}, not both")
    raw = read_toml(config_file) if config_file else {}
    try:
        check_sections(raw)
    except MixrankError as e:
        raise MixrankError(f"{config_file}: {e}") from None

    def given(key: str, section: str) -> bool:
        return key in raw or key in (raw.get(section) or {})

    defaults: dict[str, Any] = {}
    if not any(given(k, "budget") for k in ("keep", "params", "bytes")) and not given_budgets:
        defaults["bytes"] = JOB_BYTES
    budget_is_bytes = "bytes" in flags or "bytes" in defaults or (given("bytes", "budget") and not given_budgets)
    if budget_is_bytes and not given("precision", "quantize") and "precision" not in flags \
            and not given("dtype", "budget"):
        defaults["precision"] = "auto"
    if tensorrt and not given("scheme", "quantize") and "scheme" not in flags:
        defaults["scheme"] = "symmetric"
    if tensorrt and not given("widths", "quantize") and "widths" not in flags:
        defaults["widths"] = ("int8", "int4")
    try:
        return CompressConfig.from_dict(merge_settings(raw, {**defaults, **flags}))
    except MixrankError:
        if config_file:  # name the file when the file alone is wrong
            try:
                CompressConfig.from_dict(merge_settings(raw, defaults))
            except MixrankError as e:
                raise MixrankError(f"{config_file}: {e}") from None
        raise


def optional_settings() -> tuple[str, ...]:
    """Settings that only some components read. Everything else (budget, selection,
    metric, holdout, token_mask, device, seed, search.samples, search.work) matters to every
    method."""
    return ("damping", "search.rounds", "search.evals", "search.seconds", "search.groups", "search.role_scales",
            "search.forms",
            *(f"refine.{f.name}" for f in dataclasses.fields(Refine)))


def check_settings(config: CompressConfig, method: Method) -> None:
    """Refuse a setting that ``method`` never reads when it differs from its default.

    Raises:
        MixrankError: names the first such setting and the method.
    """
    used = method.settings()
    for key in optional_settings():
        if key in used:
            continue
        section, _, name = key.rpartition(".")
        value = getattr(getattr(config, section), name) if section else getattr(config, name)
        if value != _default(section, name):
            flat = flat_name(section, name) if section else name
            users = [m for m in METHODS if key in METHODS[m].settings()]
            hint = f"; it is read by method {', '.join(users)}" if users else ""
            raise MixrankError(f"setting {flat}={value!r} is ignored by method {config.method!r}: remove "
                               f"it{hint}")


def _default(section: str, name: str):
    if not section:
        return inspect.signature(CompressConfig.__init__).parameters[name].default
    return next(f.default for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
