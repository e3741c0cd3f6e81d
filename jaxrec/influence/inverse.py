"""``inverse_hvp``: one entry point to every solver, with the damping convention explicit."""

from __future__ import annotations

import jax

from jaxrec.errors import UserError
from jaxrec.influence import arnoldi, cg, exact, lissa
from jaxrec.influence.operator import FullHessian
from jaxrec.influence.tree import all_finite

SOLVERS = ("lissa", "cg", "exact", "arnoldi")
CONVENTIONS = ("standard", "dealrec")

_OPTIONS = {
    "lissa": {"steps", "scale", "batch_size", "repeats", "key", "rtol", "chunk"},
    "cg": {"tol", "maxiter", "batch_size"},
    "exact": {"batch_size", "chunk"},
    "arnoldi": {"rank", "iterations", "key", "batch_size"},
}


def inverse_hvp(loss, params, data, v, *, solver: str = "cg", damping: float = 0.0,
                convention: str = "standard", return_info: bool = False,
                progress: bool | None = None, **options):
    """``(H + damping I)^-1 v``, ``H`` the Hessian of the mean of ``loss`` over all of ``data``
    (the ``H^-1`` of paper Eq. 10).

    ``convention="dealrec"`` reproduces the paper code instead: its LiSSA recursion
    ``h <- v + (1 - d) h - H h / s`` (``d = damping``, ``s = scale``, no final division)
    converges to ``s (H + s d I)^-1 v``; every solver then returns exactly that (with
    d = 0.01, s = 25: 25 (H + 0.25 I)^-1 v).

    Options: lissa ``steps, scale, batch_size, repeats, key, rtol, chunk``; cg ``tol, maxiter,
    batch_size``; exact ``batch_size``; arnoldi ``rank, iterations, key, batch_size``
    (``batch_size`` of the full-data HVPs). Returns ``u`` or, with ``return_info``, ``(u, info)``.
    """
    if solver not in SOLVERS:
        raise UserError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    if convention not in CONVENTIONS:
        raise UserError(f"unknown convention {convention!r}; expected one of "
                        f"{', '.join(CONVENTIONS)}")
    allowed = _OPTIONS[solver] | ({"scale"} if convention == "dealrec" else set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"solver {solver!r} has no option {unknown[0]!r} "
                        f"(options: {', '.join(sorted(allowed))})")
    if damping < 0:
        raise UserError(f"damping must be >= 0, got {damping}")
    if not all_finite(v):
        raise UserError("the vector to solve for (v) is not finite")
    scale = float(options.pop("scale", 25.0)) if solver == "lissa" or convention == "dealrec" \
        else 1.0
    if solver == "lissa":
        d = damping if convention == "dealrec" else damping / scale
        h, info = lissa.solve(loss, params, data, v, d=d, scale=scale, progress=progress,
                              **options)
        u = h if convention == "dealrec" else jax.tree.map(lambda x: x / scale, h)
    else:
        lam = scale * damping if convention == "dealrec" else damping
        op = FullHessian(loss, params, data, options.pop("batch_size", 4096))
        if solver == "exact":
            u, info = exact.solve(op, v, lam, **options)
        elif solver == "cg":
            u, info = cg.solve(op, v, lam, progress=progress, **options)
        else:
            u, info = arnoldi.solve(op, v, lam, progress=progress, **options)
        if convention == "dealrec":
            u = jax.tree.map(lambda x: scale * x, u)
    if not all_finite(u):
        raise UserError(f"solver {solver!r} produced a non-finite result; increase --damping")
    info = dict(info, solver=solver, convention=convention, damping=damping,
                **({"scale": scale} if convention == "dealrec" or solver == "lissa" else {}))
    return (u, info) if return_info else u
