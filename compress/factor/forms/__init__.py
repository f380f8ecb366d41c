"""Layer forms (`FORMS`): ``lowrank``, the ``rows``/``cols`` forms of a pair's layers, and
``residual`` (low rank plus a quantized dense residual).
Each owns its cost, forward, storage and ONNX emitter; adding one is a module here plus
its import below (docs/design.md, "Adding a layer form")."""

from ._base import FORMS, EmitContext, LayerForm, form_of
from ._lowrank import LowRank
from ._pairwise import Cols, Rows
from ._residual import Residual
