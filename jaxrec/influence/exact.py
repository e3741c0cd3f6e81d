"""Exact solver: materialise H (from HVPs with basis vectors) and solve in float64 (NumPy).
For small parameter subsets only: memory O(d^2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxrec.base import Params
from jaxrec.errors import UserError
from jaxrec.influence.operator import FullHessian

MAX_DIM = 20_000


def hessian_matrix(op: FullHessian, chunk: int = 256) -> np.ndarray:
    """The ``d x d`` Hessian (float64 NumPy), built from ``d`` HVPs, ``chunk`` at a time."""
    flat, unravel = ravel_pytree(op.params)
    d = flat.size
    if d > MAX_DIM:
        raise UserError(
            f"exact solver would build a {d} x {d} Hessian; pick a parameter "
            f"subset of at most {MAX_DIM} values (params=), or use solver='cg' "
            f"or solver='lissa'"
        )
    cols = []
    for start in range(0, d, chunk):
        k = min(chunk, d - start)
        basis = jnp.zeros((k, d), flat.dtype).at[jnp.arange(k), start + jnp.arange(k)].set(1)
        vs = jax.vmap(unravel)(basis)
        hv = op.matmat(vs)
        cols.append(np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(hv), np.float64))
    h = np.concatenate(cols, 0).T
    h = 0.5 * (h + h.T)
    if not np.all(np.isfinite(h)):
        raise UserError("Hessian is not finite; check the model, data and parameter filter")
    return h


def solve(op: FullHessian, v: Params, damping: float, *, chunk: int = 256) -> tuple[Params, dict]:
    """``(H + damping I)^-1 v`` by a dense float64 solve. Returns ``(u, info)``."""
    flat_v, unravel = ravel_pytree(v)
    h = hessian_matrix(op, chunk)
    a = h + damping * np.eye(h.shape[0])
    try:
        x = np.linalg.solve(a, np.asarray(flat_v, np.float64))
    except np.linalg.LinAlgError:
        raise UserError(f"H + {damping} I is singular; increase damping=") from None
    eig = np.linalg.eigvalsh(h)
    info = {
        "dim": int(h.shape[0]),
        "eig_min": float(eig[0]),
        "eig_max": float(eig[-1]),
        "hvps": int(h.shape[0]),
    }
    return unravel(jnp.asarray(x, flat_v.dtype)), info
