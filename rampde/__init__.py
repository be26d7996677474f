"""rampde: mixed-precision explicit Runge-Kutta solvers for neural ODEs.

``rampde.odeint`` is a drop-in for ``torchdiffeq.odeint`` (fixed-grid explicit methods) that takes
its precision from the surrounding ``torch.autocast`` region and differentiates with the exact
discrete adjoint, accumulating the state, the adjoint and every gradient in fp32 (or wider).
"""

__version__ = "0.1.0"

from .odeint import odeint  # noqa: E402
from .scaling import DynamicScaler  # noqa: E402
from .step_graphs import release_graph_pools  # noqa: E402
from .tableaus import TABLEAUS, ButcherTableau  # noqa: E402

__all__ = ["odeint", "DynamicScaler", "ButcherTableau", "TABLEAUS", "release_graph_pools", "__version__"]
