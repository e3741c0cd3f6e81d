"""Conjugate gradient on full-data HVPs: ``(H + damping I) u = v``."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from jaxrec.base import Params
from jaxrec.errors import UserError
from jaxrec.influence import tree as T
from jaxrec.influence.batching import _disable
from jaxrec.influence.operator import FullHessian


def solve(
    op: FullHessian,
    v: Params,
    damping: float,
    *,
    tol: float = 1e-6,
    maxiter: int = 100,
    progress: bool | None = None,
) -> tuple[Params, dict]:
    """CG until ``||r|| <= tol ||v||`` or ``maxiter`` iterations. Returns ``(u, info)`` with the
    relative residual trace. Raises UserError on non-positive curvature (increase damping)."""

    def apply(x):
        return T.axpy(damping, x, op.matvec(x))

    vnorm = float(T.norm(v))
    x = T.scale(0.0, v)
    if vnorm == 0.0:
        return x, {"iterations": 0, "residuals": [0.0], "converged": True}
    r, p = v, v
    rr = float(T.vdot(r, r))
    trace = [np.sqrt(rr) / vnorm]
    it = 0
    for it in tqdm(range(1, maxiter + 1), desc="cg", leave=False, disable=_disable(progress)):
        ap = apply(p)
        pap = float(T.vdot(p, ap))
        if not np.isfinite(pap) or pap <= 0:
            raise UserError(
                f"CG met non-positive curvature (p.Ap = {pap:.3g}) at iteration "
                f"{it}: H + {damping} I is not positive definite; increase damping="
            )
        alpha = rr / pap
        x = T.axpy(alpha, p, x)
        r = T.axpy(-alpha, ap, r)
        rr_new = float(T.vdot(r, r))
        trace.append(np.sqrt(rr_new) / vnorm)
        if trace[-1] <= tol:
            break
        p = T.axpy(rr_new / rr, p, r)
        rr = rr_new
    return x, {
        "iterations": it,
        "residuals": trace,
        "converged": bool(trace[-1] <= tol),
        "hvps": it,
    }
