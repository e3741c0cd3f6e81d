"""Small pytree vector algebra shared by the solvers (vectors are parameter pytrees)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrec.base import Params


def vdot(a: Params, b: Params) -> jax.Array | float:
    """Sum over leaves of ``<a, b>``."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def norm(a: Params) -> jax.Array:
    """The Euclidean norm of the pytree vector ``a``."""
    return jnp.sqrt(vdot(a, a))


def axpy(alpha: float | jax.Array, x: Params, y: Params) -> Params:
    """``alpha * x + y``."""
    return jax.tree.map(lambda xi, yi: alpha * xi + yi, x, y)


def scale(alpha: float | jax.Array, x: Params) -> Params:
    """``alpha * x``."""
    return jax.tree.map(lambda xi: alpha * xi, x)


def all_finite(a: Params) -> bool:
    """Whether every value of ``a`` is finite."""
    return bool(all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(a)))
