"""Small pytree vector algebra shared by the solvers (vectors are parameter pytrees)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def vdot(a, b):
    """Sum over leaves of ``<a, b>``."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def norm(a):
    return jnp.sqrt(vdot(a, a))


def axpy(alpha, x, y):
    """``alpha * x + y``."""
    return jax.tree.map(lambda xi, yi: alpha * xi + yi, x, y)


def scale(alpha, x):
    return jax.tree.map(lambda xi: alpha * xi, x)


def all_finite(a) -> bool:
    return bool(all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(a)))
