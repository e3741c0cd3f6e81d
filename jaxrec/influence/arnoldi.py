"""Arnoldi low-rank inverse (Schioppa et al., 2022, "Scaling up influence functions"):
``iterations`` Arnoldi steps on full-data HVPs give a Krylov basis; the top-``rank`` eigenpairs
(by |eigenvalue|) of its projection approximate H, and
``u = sum_k <e_k, v> / (lambda_k + damping) e_k``. Memory O(iterations x params)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

from jaxrec.base import Params
from jaxrec.errors import UserError
from jaxrec.influence.batching import _disable
from jaxrec.influence.operator import FullHessian


def eigenpairs(
    op: FullHessian,
    *,
    rank: int = 20,
    iterations: int = 60,
    key: jax.Array | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, jax.Array, Callable[[jax.Array], Params]]:
    """Top-``rank`` eigenvalues ``[k]`` and flat eigenvectors ``[k, d]`` of the full-data H."""
    flat0, unravel = ravel_pytree(op.params)
    d = flat0.size
    iterations = min(iterations, d)
    rank = min(rank, iterations)
    key = jax.random.PRNGKey(0) if key is None else key
    q = jax.random.normal(key, (d,), flat0.dtype)
    basis = [q / jnp.linalg.norm(q)]
    hess = np.zeros((iterations + 1, iterations))
    for k in tqdm(range(iterations), desc="arnoldi", leave=False, disable=_disable(progress)):
        w = ravel_pytree(op.matvec(unravel(basis[k])))[0]
        for j in range(k + 1):  # modified Gram-Schmidt
            hess[j, k] = float(jnp.vdot(basis[j], w))
            w = w - hess[j, k] * basis[j]
        # a second pass ("twice is enough"): with clustered eigenvalues the Krylov vectors are
        # nearly parallel and one float32 pass leaves w far from orthogonal to the basis
        for j in range(k + 1):
            c = float(jnp.vdot(basis[j], w))
            hess[j, k] += c
            w = w - c * basis[j]
        hess[k + 1, k] = float(jnp.linalg.norm(w))
        if hess[k + 1, k] < 1e-10 * max(1.0, abs(hess[k, k])):
            iterations = k + 1  # Krylov space exhausted: exact on it
            break
        basis.append(w / hess[k + 1, k])
    small = hess[:iterations, :iterations]
    lam, vec = np.linalg.eigh(0.5 * (small + small.T))
    top = np.argsort(-np.abs(lam))[:rank]
    v_basis = jnp.stack(basis[:iterations])  # [m, d]
    eigvecs = jnp.asarray(vec[:, top].T, flat0.dtype) @ v_basis  # [k, d]
    return lam[top], eigvecs, unravel


def solve(
    op: FullHessian,
    v: Params,
    damping: float,
    *,
    rank: int = 20,
    iterations: int = 60,
    key: jax.Array | None = None,
    progress: bool | None = None,
) -> tuple[Params, dict]:
    """Low-rank ``(H + damping I)^-1 v`` on the top-``rank`` eigenspace. Returns ``(u, info)``."""
    lam, vecs, unravel = eigenpairs(
        op, rank=rank, iterations=iterations, key=key, progress=progress
    )
    if np.any(lam + damping <= 0):
        raise UserError(
            f"Arnoldi found eigenvalue {lam.min():.3g} <= -damping; increase "
            f"damping= above {-lam.min():.3g}"
        )
    flat_v = ravel_pytree(v)[0]
    coef = (vecs @ flat_v) / jnp.asarray(lam + damping, flat_v.dtype)
    u = unravel(coef @ vecs)
    return u, {"eigenvalues": [float(x) for x in lam], "rank": int(lam.size), "hvps": op.count}
