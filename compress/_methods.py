"""Methods: a named recipe of a factorizer, an allocator and refinements.

``mixrank`` is the activation-aware closed form, the end-to-end allocation search and
every refinement; the baselines are a factorizer at the uniform allocation. A method's
settings are the union of what its components declare they read; any other setting
given a non-default value is refused, so nothing is ignored silently
(docs/design.md, "Configuration").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ._allocate import ALLOCATORS
from ._errors import MixrankError
from ._factorizers import FACTORIZERS
from ._refine import REFINEMENTS
from ._registry import Registry


@dataclass(frozen=True)
class Method:
    factorizer: str
    allocator: str = "uniform"
    refinements: tuple[str, ...] = ()
    pairs: bool = False  # offers the pairwise forms (selection.structure)

    def settings(self) -> set[str]:
        """Every setting its components read (``"damping"``, ``"search.evals"``, ...)."""
        used = set(FACTORIZERS[self.factorizer].settings) | set(ALLOCATORS[self.allocator].settings)
        for r in self.refinements:
            used |= set(REFINEMENTS[r].settings)
        return used


METHODS: Registry[Method] = Registry("method")
METHODS.add("mixrank", Method("whiten", "search", ("sparse", "compensate", "sequential", "distill", "qdistill"),
                              pairs=True))
METHODS.add("whiten", Method("whiten"))
METHODS.add("svd", Method("svd"))
METHODS.add("asvd", Method("asvd"))
METHODS.add("oats", Method("oats"))



def optional_settings() -> tuple[str, ...]:
    """Settings that only some components read. Everything else (budget, selection,
    metric, holdout, token_mask, device, seed, search.samples, search.work) matters to every method."""
    from ._config import Refine

    return ("damping", "search.rounds", "search.evals", "search.seconds", "search.groups", "search.role_scales",
            *(f"refine.{f.name}" for f in dataclasses.fields(Refine)))


def check_settings(config, method: Method) -> None:
    """Refuse a setting that ``method`` never reads when it differs from its default.

    Raises:
        MixrankError: names the first such setting and the method.
    """
    from ._config import CompressConfig, flat_name

    used = method.settings()
    for key in optional_settings():
        if key in used:
            continue
        section, _, name = key.rpartition(".")
        value = getattr(getattr(config, section), name) if section else getattr(config, name)
        default = _default(CompressConfig, section, name)
        if value != default:
            flat = flat_name(section, name) if section else name
            users = [m for m in METHODS if key in METHODS[m].settings()]
            hint = f"; it is read by method {', '.join(users)}" if users else ""
            raise MixrankError(f"setting {flat}={value!r} is ignored by method {config.method!r}: remove "
                               f"it{hint}")


def _default(cls, section: str, name: str):
    from ._config import SECTIONS

    if not section:
        import inspect

        return inspect.signature(cls.__init__).parameters[name].default
    return next(f.default for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
