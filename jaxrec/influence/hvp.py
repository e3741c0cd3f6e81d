"""Hessian-vector products by forward-over-reverse differentiation (paper Eq. 10's H^-1 needs
only products H v, never H itself)."""

from __future__ import annotations

import jax

from jaxrec.base import Batch, Loss, Params


def hvp(loss: Loss, params: Params, batch: Batch, v: Params) -> Params:
    """``H v`` where ``H`` is the Hessian of ``loss(params, batch)`` w.r.t. ``params``.

    Forward-over-reverse: the JVP of ``jax.grad(loss)`` along ``v``; cost about 3 gradients,
    memory O(params + batch). ``params`` and ``v`` are pytrees of the same structure.
    """
    return jax.jvp(lambda p: jax.grad(loss)(p, batch), (params,), (v,))[1]
