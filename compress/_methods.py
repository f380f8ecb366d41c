"""Methods: a named recipe of a factorizer, an allocator and refinements.

``mixrank`` is the activation-aware closed form, the end-to-end allocation search and
every refinement; the baselines are a factorizer at the uniform allocation. A method's
settings are the union of what its components declare they read; any other setting
given a non-default value is refused, so nothing is ignored silently
(`mixrank.compress._config.check_settings`; docs/design.md, "Configuration").
"""

from __future__ import annotations

from dataclasses import dataclass

from mixrank.core import Registry

from .allocate import ALLOCATORS
from .factor import FACTORIZERS
from .refine import REFINEMENTS


@dataclass(frozen=True)
class Method:
    """A recipe.

    Attributes:
        factorizer: a `FACTORIZERS` name (the closed form and the fit).
        allocator: an `ALLOCATORS` name (how ranks and precisions are chosen).
        refinements: `REFINEMENTS` names, run in this order by the guarded step.
        pairs: the method offers the pairwise forms (``selection.structure``).
    """

    factorizer: str
    allocator: str = "uniform"
    refinements: tuple[str, ...] = ()
    pairs: bool = False

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
METHODS.add("quantize", Method("whiten", "dense"))  # quantization alone: every layer dense, its width chosen
