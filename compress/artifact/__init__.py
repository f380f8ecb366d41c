"""The compression's artifact: the typed, versioned `Plan`, the factors file (`Factors`,
`save_factors`, `load_factors`), what ships (`realize`: every layer stored at its
precision) and the factored PyTorch model (`FactoredLinear`, `apply_factors`)."""

from ._factored import FactoredLinear, apply_factors, factored_from_fit, fit_from_factored, set_module
from ._factors import (
    DIGEST_KEY,
    PLAN_KEY,
    Factors,
    check_pinned_digest,
    load_factors,
    pinned_digest,
    save_factors,
    weight_fingerprint,
)
from ._plan import (
    FORMAT_VERSION,
    READABLE_VERSIONS,
    AllocationInfo,
    BudgetInfo,
    CalibrationInfo,
    LayerPlan,
    Plan,
    RefinementInfo,
    SourceInfo,
    SparsePlan,
    Totals,
)
from ._realize import Realized, realize
from ._validate import validate_factors
