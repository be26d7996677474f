"""Explicit Butcher tableaus, one data object per method.

The names that torchdiffeq also has give torchdiffeq's scheme, so that at fp32 and fp64 a rampde
trajectory matches torchdiffeq's: note that torchdiffeq's fixed-grid ``rk4`` is Kutta's 3/8 rule;
the classic RK4 is here under ``rk4_classic``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method: ``k_i = f(t + c_i h, y + h sum_{j<i} a_ij k_j)``,
    ``y_next = y + h sum_i b_i k_i``. ``a`` holds the strictly lower triangle row by row.

    Cost per step: ``stages`` evaluations forward; the discrete adjoint recomputes them and takes
    one vector-Jacobian product per stage.
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]

    def __post_init__(self) -> None:
        s = len(self.b)
        if len(self.c) != s or len(self.a) != s:
            raise ValueError(f"tableau {self.name!r}: c, a and b must all have {s} rows")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"tableau {self.name!r}: row {i} of a must have {i} entries (explicit method)")
        if abs(sum(self.b) - 1.0) > 1e-12:
            raise ValueError(f"tableau {self.name!r}: weights b must sum to 1")

    @property
    def stages(self) -> int:
        return len(self.b)


_third = 1.0 / 3.0

EULER = ButcherTableau("euler", 1, c=(0.0,), a=((),), b=(1.0,))
MIDPOINT = ButcherTableau("midpoint", 2, c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0))
HEUN2 = ButcherTableau("heun2", 2, c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5))
HEUN3 = ButcherTableau(
    "heun3", 3, c=(0.0, _third, 2 * _third), a=((), (_third,), (0.0, 2 * _third)), b=(0.25, 0.0, 0.75)
)
# torchdiffeq's fixed-grid "rk4": Kutta's 3/8 rule.
RK4_38 = ButcherTableau(
    "rk4",
    4,
    c=(0.0, _third, 2 * _third, 1.0),
    a=((), (_third,), (-_third, 1.0), (1.0, -1.0, 1.0)),
    b=(0.125, 0.375, 0.375, 0.125),
)
RK4_CLASSIC = ButcherTableau(
    "rk4_classic",
    4,
    c=(0.0, 0.5, 0.5, 1.0),
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
)

TABLEAUS: dict[str, ButcherTableau] = {
    t.name: t for t in (EULER, MIDPOINT, HEUN2, HEUN3, RK4_38, RK4_CLASSIC)
}
ALIASES: dict[str, str] = {"heun": "heun2", "rk2": "heun2", "rk4_38": "rk4"}

# torchdiffeq's methods that need an adaptive step or an implicit solve: a discrete adjoint of a
# fixed explicit scheme does not apply to them.
UNSUPPORTED: dict[str, str] = {
    "dopri5": "adaptive",
    "dopri8": "adaptive",
    "bosh3": "adaptive",
    "fehlberg2": "adaptive",
    "adaptive_heun": "adaptive",
    "explicit_adams": "multistep",
    "implicit_adams": "implicit multistep",
    "fixed_adams": "implicit multistep",
    "scipy_solver": "external adaptive",
}


def get_tableau(method: str) -> ButcherTableau:
    """Look a method up by name; a clear ``ValueError`` for unknown or unsupported names."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string naming a method, got {type(method).__name__}")
    name = ALIASES.get(method, method)
    if name in TABLEAUS:
        return TABLEAUS[name]
    known = ", ".join(sorted([*TABLEAUS, *ALIASES]))
    if method in UNSUPPORTED:
        raise ValueError(
            f"method={method!r} is {UNSUPPORTED[method]} and is not supported: rampde differentiates "
            f"a fixed-grid explicit Runge-Kutta scheme exactly (discrete adjoint), which needs the same "
            f"steps forward and backward; choose one of: {known} (with options={{'step_size': h}} "
            f"for a finer grid)"
        )
    raise ValueError(f"unknown method={method!r}; choose one of: {known}")
