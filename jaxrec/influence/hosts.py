"""Several processes (hosts) on JAX's multi-process runtime (``jax.distributed``).

Under ``jax.distributed`` every process runs the same program on its own rows of the data
(:func:`row_range`); what crosses processes goes through XLA collectives on a mesh of every
device of every process (:func:`global_mesh`): the sum of a parameter-sized pytree
(:func:`allreduce`: once for the mean gradient, once per full-data HVP of CG and the exact
solver) and small integer tables (:func:`allgather`). LiSSA's minibatches are assembled inside
its jitted chunk (``jaxrec.influence.lissa``). With one process every function here is the
identity or the local value, so the single-process path is unchanged.

Values kept between steps are *local* arrays (on this process's devices), identical on every
process; :func:`replicate` / :func:`localize` convert to and from replicated global arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrec.base import ArrayLike
from jaxrec.errors import UserError


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Join the multi-process runtime: ``jax.distributed.initialize``.

    Args:
      coordinator: ``HOST:PORT`` of process 0's coordination service, or ``"auto"``: no
        arguments, so JAX reads its launcher (SLURM, Open MPI, Kubernetes;
        ``JAX_COORDINATOR_ADDRESS``). ``""``: do nothing (one process).
      num_processes, process_id: the number of processes and this one's index; ``0`` / ``-1``
        leave them to JAX's auto-detection.
    """
    if not coordinator:
        if num_processes > 1 or process_id >= 0:
            raise UserError(
                "num_processes / process_id need a coordinator (HOST:PORT, or 'auto' "
                "for a cluster launcher)"
            )
        return
    if num_processes < 0 or (num_processes and not -1 <= process_id < num_processes):
        raise UserError(
            f"process_id must be in 0..num_processes-1 (got {process_id} of {num_processes})"
        )
    if coordinator == "auto":
        jax.distributed.initialize()
        return
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes or None,
        process_id=process_id if process_id >= 0 else None,
    )


def multi() -> bool:
    """Whether several processes run this program."""
    return jax.process_count() > 1


def row_range(n: int, processes: int | None = None, index: int | None = None) -> tuple[int, int]:
    """Rows ``[a, b)`` of ``n`` that process ``index`` of ``processes`` reads: contiguous
    ranges, in process order, sizes differing by at most one (default: this process)."""
    processes = jax.process_count() if processes is None else processes
    index = jax.process_index() if index is None else index
    if n < processes:
        raise UserError(f"{n} rows cannot be split over {processes} processes")
    cuts = [(n * k) // processes for k in range(processes + 1)]
    return cuts[index], cuts[index + 1]


@functools.lru_cache(maxsize=1)
def global_mesh() -> Mesh:
    """A 1-D mesh (axis ``data``) over every device of every process, process by process: the
    rows of process ``p`` sit in block ``p`` of an array sharded along ``data``."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), ("data",))


def replicate(tree: Any) -> Any:
    """A pytree of local arrays (equal on every process) as replicated global arrays."""
    mesh = global_mesh()
    sharding = NamedSharding(mesh, P())

    def one(x):
        x = jnp.asarray(x)
        shards = [jax.device_put(x, d) for d in mesh.local_devices]
        return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)

    return jax.tree.map(one, tree)


def localize(tree: Any) -> Any:
    """Replicated global arrays as local arrays (this process's copy)."""
    return jax.tree.map(lambda x: x.addressable_data(0), tree)


def shard_rows(array: np.ndarray) -> jax.Array:
    """This process's rows ``[m, ...]`` (equal ``m`` on every process) as block ``p`` of a
    global array ``[P * m, ...]`` sharded along ``data``."""
    return jax.make_array_from_process_local_data(
        NamedSharding(global_mesh(), P("data")), np.asarray(array)
    )


def shard_rows_tree(tree: Any) -> Any:
    """:func:`shard_rows` on every leaf of ``tree``."""
    return jax.tree.map(shard_rows, tree)


@functools.lru_cache(maxsize=1)
def _sum_blocks():
    out = NamedSharding(global_mesh(), P())
    return jax.jit(lambda t: jax.tree.map(lambda x: jnp.sum(x, 0), t), out_shardings=out)


def allreduce(tree: Any) -> Any:
    """The sum over processes of a pytree of local arrays, as local arrays (one XLA
    all-reduce; the identity with one process)."""
    if not multi():
        return tree
    k = jax.local_device_count()

    def block(x):
        x = np.asarray(x)
        local = np.zeros((k, *x.shape), x.dtype)
        local[0] = x
        return shard_rows(local)

    return localize(_sum_blocks()(jax.tree.map(block, tree)))


def allgather(values: ArrayLike) -> np.ndarray:
    """``[P, ...]``: every process's ``values`` (small integer tables), in process order."""
    values = np.asarray(values)
    if not multi():
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name``."""
    if multi():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
