"""``inverse_hvp``: one entry point to every solver, with the damping convention explicit.

Each solver's options are one frozen dataclass (:class:`LissaOptions`, :class:`CGOptions`,
:class:`ExactOptions`, :class:`ArnoldiOptions`, defined with their documented defaults in
:mod:`jaxrec.influence_options`, which the configs of the command line nest).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxrec.base import Loss, Params
from jaxrec.influence_options import (
    SOLVER_OPTIONS,
    ArnoldiOptions,
    CGOptions,
    ExactOptions,
    LissaOptions,
)
from jaxrec.errors import UserError
from jaxrec.influence import arnoldi, cg, exact, lissa
from jaxrec.influence.batching import Data
from jaxrec.influence.operator import FullHessian
from jaxrec.influence.tree import all_finite

SOLVERS = tuple(SOLVER_OPTIONS)
CONVENTIONS = ("standard", "dealrec")
SolverOptions = LissaOptions | CGOptions | ExactOptions | ArnoldiOptions


def solver_options(
    solver: Any,  # a name or an options instance, checked at run time (else UserError)
    **overrides: Any,
) -> SolverOptions:
    """The option dataclass for ``solver`` (a name or an options instance), with ``overrides``
    (keyword options, e.g. ``steps=2000``) replacing its fields. An unknown name is an error."""
    if isinstance(solver, str):
        if solver not in SOLVER_OPTIONS:
            raise UserError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
        solver = SOLVER_OPTIONS[solver]()
    elif not isinstance(solver, tuple(SOLVER_OPTIONS.values())):
        raise UserError(
            f"solver must be a name ({', '.join(SOLVERS)}) or an options "
            f"dataclass, got {type(solver).__name__}"
        )
    names = {f.name for f in dataclasses.fields(solver)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(
            f"solver {solver_name(solver)!r} has no option {unknown[0]!r} "
            f"(options: {', '.join(sorted(names))})"
        )
    return dataclasses.replace(solver, **overrides)


def solver_name(options: SolverOptions) -> str:
    return next(k for k, cls in SOLVER_OPTIONS.items() if isinstance(options, cls))


def inverse_hvp(
    loss: Loss,
    params: Params,
    data: Data,
    v: Params,
    *,
    solver: str | SolverOptions = "cg",
    damping: float = 0.0,
    convention: str = "standard",
    scale: float = 25.0,
    progress: bool | None = None,
    **options: Any,
) -> Params:
    """``(H + damping I)^-1 v`` (the ``H^-1`` of paper Eq. 10): :func:`inverse_hvp_with_info`
    without the solver's report; the same arguments."""
    return inverse_hvp_with_info(
        loss,
        params,
        data,
        v,
        solver=solver,
        damping=damping,
        convention=convention,
        scale=scale,
        progress=progress,
        **options,
    )[0]


def inverse_hvp_with_info(
    loss: Loss,
    params: Params,
    data: Data,
    v: Params,
    *,
    solver: str | SolverOptions = "cg",
    damping: float = 0.0,
    convention: str = "standard",
    scale: float = 25.0,
    progress: bool | None = None,
    **options: Any,
) -> tuple[Params, dict]:
    """``(H + damping I)^-1 v``, ``H`` the Hessian of the mean of ``loss`` over all of ``data``
    (the ``H^-1`` of paper Eq. 10).

    ``solver``: a name (``lissa``, ``cg``, ``exact``, ``arnoldi``; default options) or an
    options dataclass, e.g. ``LissaOptions(steps=2000, batch_size=32)``. Keyword ``options``
    override its fields (``inverse_hvp(..., solver="cg", tol=1e-8)``).

    ``scale``: LiSSA's step is ``1/scale``. ``convention="dealrec"`` reproduces the paper code:
    its LiSSA recursion ``h <- v + (1 - d) h - H h / s`` (``d = damping``, ``s = scale``, no
    final division) converges to ``s (H + s d I)^-1 v``, and every solver then returns exactly
    that (with d = 0.01, s = 25: 25 (H + 0.25 I)^-1 v). Under ``"standard"`` the other solvers
    ignore ``scale``.

    Returns ``(u, info)``: ``info`` is the solver's report (LiSSA's ``norm_trace`` and
    ``steps_run``, CG's residuals, eigenvalues, ...).

    Long because: the one dispatch over the four solvers, with the conventions each needs.
    """
    opts = solver_options(solver, **options)
    name = solver_name(opts)
    if convention not in CONVENTIONS:
        raise UserError(
            f"unknown convention {convention!r}; expected one of {', '.join(CONVENTIONS)}"
        )
    if damping < 0:
        raise UserError(f"damping must be >= 0, got damping={damping}")
    if not all_finite(v):
        raise UserError("the vector to solve for (v) is not finite")
    if name == "arnoldi" and jax.process_count() > 1:
        raise UserError("solver='arnoldi' runs in one process; use lissa, cg or exact")
    dealrec = convention == "dealrec"
    if isinstance(opts, LissaOptions):
        d = damping if dealrec else damping / scale
        h, info = lissa.solve(
            loss, params, data, v, d=d, scale=scale, options=opts, progress=progress
        )
        u = h if dealrec else jax.tree.map(lambda x: x / scale, h)
    else:
        lam = scale * damping if dealrec else damping
        op = FullHessian(loss, params, data, opts.batch_size)
        if isinstance(opts, ExactOptions):
            u, info = exact.solve(op, v, lam, chunk=opts.chunk)
        elif isinstance(opts, CGOptions):
            u, info = cg.solve(op, v, lam, tol=opts.tol, maxiter=opts.maxiter, progress=progress)
        else:
            assert isinstance(opts, ArnoldiOptions)
            u, info = arnoldi.solve(
                op,
                v,
                lam,
                rank=opts.rank,
                iterations=opts.iterations,
                key=jax.random.PRNGKey(opts.seed),
                progress=progress,
            )
        if dealrec:
            u = jax.tree.map(lambda x: scale * x, u)
    if not all_finite(u):
        raise UserError(
            f"solver {name!r} produced a non-finite result; increase damping= (now {damping})"
        )
    info = dict(
        info,
        solver=name,
        convention=convention,
        damping=damping,
        **({"scale": scale} if dealrec or name == "lissa" else {}),
    )
    return u, info
