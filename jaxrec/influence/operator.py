"""The full-data Hessian as a linear operator: ``H v = sum_b (|b|/n) H_b v`` over batches."""

from __future__ import annotations

import jax

from jaxrec.base import Params
from jaxrec.errors import UserError
import jaxrec.influence.hosts as hosts
from jaxrec.influence.batching import full_batches
from jaxrec.influence.hvp import hvp
from jaxrec.influence.tree import all_finite


class FullHessian:
    """``H`` of the mean of ``loss`` over all of ``data`` (batches of ``batch_size``). Under
    JAX's multi-process runtime ``data`` is this process's rows and each product is summed
    over processes (one all-reduce of the product's size)."""

    def __init__(self, loss, params, data, batch_size: int = 4096):
        self.params = params
        self.batches = full_batches(data, batch_size)
        self._hvp = jax.jit(lambda p, b, v: hvp(loss, p, b, v))
        self._hmm = jax.jit(jax.vmap(lambda p, b, v: hvp(loss, p, b, v), in_axes=(None, None, 0)))
        self.count = 0

    def matvec(self, v: Params) -> Params:
        """``H v`` (``v`` a parameter pytree); raises UserError if not finite."""
        out = None
        for w, batch in self.batches:
            hv = jax.tree.map(lambda x, w=w: w * x, self._hvp(self.params, batch, v))
            out = hv if out is None else jax.tree.map(lambda a, b: a + b, out, hv)
        if hosts.multi():
            out = hosts.allreduce(jax.tree.map(jax.numpy.zeros_like, v) if out is None else out)
        self.count += 1
        if not all_finite(out):
            raise UserError(
                "Hessian-vector product is not finite; check the model, data "
                "and parameter subset (params=)"
            )
        return out

    def matmat(self, vs: Params) -> Params:
        """``H v`` for a stack of vectors (leading axis k on every leaf)."""
        out = None
        for w, batch in self.batches:
            hv = jax.tree.map(lambda x, w=w: w * x, self._hmm(self.params, batch, vs))
            out = hv if out is None else jax.tree.map(lambda a, b: a + b, out, hv)
        if hosts.multi():
            out = hosts.allreduce(jax.tree.map(jax.numpy.zeros_like, vs) if out is None else out)
        return out
