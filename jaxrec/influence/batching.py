"""Fixed-size, padded, device-sharded batches over a data pytree (leading axis n).

Every batch has the same shape (the last one is padded with copies of its first row and a 0
weight), so each jitted function compiles once. Batches are split over all visible devices
along a ``data`` mesh axis; parameters are replicated. Nothing here holds more than one batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxrec.base import Batch
from jaxrec.errors import UserError
import jaxrec.influence.hosts as hosts


def data_size(data: Batch) -> int:
    """The common leading size ``n`` of every leaf of ``data``."""
    sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(data)}
    if len(sizes) != 1:
        raise UserError(f"data leaves disagree on the number of samples: {sorted(sizes)}")
    return sizes.pop()


@dataclass(frozen=True, eq=False)
class Strata:
    """One data set cut into strata (e.g. length buckets cut to different widths, so each
    compiles once) that knows its order: row ``k`` of the strata concatenated is row
    ``order[k]`` of the data set. Every per-row result of the engine over a ``Strata``
    (:func:`jaxrec.influence.per_sample_map`, attribution scores, query gradients) comes back
    in the data set's order (:meth:`in_order`), so no caller reorders by hand.

    Attributes:
      parts: the strata, pytrees with a leading row axis each.
      order: ``[n]`` int, a permutation of ``range(n)``.
    """

    parts: tuple
    order: np.ndarray

    def __init__(self, parts: Sequence[Any], order: np.ndarray | None = None):
        parts = tuple(parts)
        if not parts:
            raise UserError("no data: the list of strata is empty")
        n = sum(data_size(p) for p in parts)
        order = np.arange(n) if order is None else np.asarray(order)
        if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
            raise UserError(f"Strata: order must be a permutation of range({n})")
        object.__setattr__(self, "parts", parts)
        object.__setattr__(self, "order", order)

    def in_order(self, values: np.ndarray) -> np.ndarray:
        """Per-row ``values`` in strata order (leading axis ``n``) -> the data set's order."""
        values = np.asarray(values)
        out = np.empty_like(values)
        out[self.order] = values
        return out


#: what the engine runs over: one pytree, a list of strata (their concatenation) or a
#: :class:`Strata`
Data: TypeAlias = Batch | list | Strata


def in_order(data: Data, values: Any) -> Any:
    """``values`` (per row of ``data``, in strata order, leading axis ``n``) in the order of
    the data set ``data`` stands for: reordered when ``data`` is a :class:`Strata`, else as
    they are (a pytree or a plain list of strata is its own order)."""
    if not isinstance(data, Strata):
        return values
    if isinstance(values, np.ndarray):
        return data.in_order(values)
    return jax.tree.map(lambda x: x[np.argsort(data.order)], values)


def strata(data: Data) -> list:
    """``data`` as a list of strata. A :class:`Strata` gives its parts; a list of pytrees (e.g.
    length buckets cut to different widths) stands for their concatenation, in order;
    anything else is one stratum."""
    if isinstance(data, Strata):
        return list(data.parts)
    out = list(data) if isinstance(data, list) else [data]
    if not out:
        raise UserError("no data: the list of strata is empty")
    return out


def total_size(data: Data) -> int:
    """Number of samples over all strata of ``data``."""
    return sum(data_size(s) for s in strata(data))


def global_size(data: Data) -> int:
    """Number of samples over all strata of ``data`` and, under JAX's multi-process runtime,
    over every process (each holds its own rows)."""
    return int(hosts.allgather(total_size(data)).sum())


def data_mesh() -> Mesh:
    """A 1-D mesh over this process's devices, axis name ``data`` (with one process: every
    visible device). Per-sample passes need no other process's rows."""
    return Mesh(
        np.array(jax.devices() if jax.process_count() == 1 else jax.local_devices()), ("data",)
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` placed on every device of ``mesh`` (parameters)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard(tree: Any, mesh: Mesh) -> Any:
    """Place a host batch split along the mesh's ``data`` axis. On a mesh spanning several
    processes each process passes its own rows and gets the global batch
    (``make_array_from_process_local_data``; see docs/benchmarks.md, "Several hosts")."""
    sharding = NamedSharding(mesh, P("data"))
    if not mesh.is_multi_process:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def round_batch(batch_size: int, n: int, n_devices: int) -> int:
    """Batch size actually used: at most ``n`` rounded up to a multiple of the device count."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    b = min(batch_size, n)
    return -(-b // n_devices) * n_devices


def padded_batches(
    data: Batch, batch_size: int, mesh: Mesh | None = None
) -> Iterator[tuple[int, int, Any, Any]]:
    """Yield ``(start, count, batch, weight)`` over ``data`` in order.

    ``batch`` has exactly ``batch_size`` rows (rounded to the device count): the last batch
    is padded with copies of its first row; ``weight`` is 1.0 for real rows, 0.0 for padding.
    With ``mesh``, both are placed sharded along its ``data`` axis.
    """
    n = data_size(data)
    ndev = 1 if mesh is None else mesh.devices.size
    b = round_batch(batch_size, n, ndev)
    host = jax.tree.map(np.asarray, data)
    for start in range(0, n, b):
        count = min(b, n - start)
        idx = np.arange(start, start + b)
        idx[count:] = start
        batch = jax.tree.map(lambda x, idx=idx: x[idx], host)
        weight = (np.arange(b) < count).astype(np.float32)
        if mesh is not None:
            batch, weight = shard((batch, weight), mesh)
        yield start, count, batch, weight


def num_batches(n: int, batch_size: int, n_devices: int = 1) -> int:
    """How many batches of :func:`padded_batches` cover ``n`` rows."""
    b = round_batch(batch_size, n, n_devices)
    return -(-n // b)


def strata_batches(
    data: Data, batch_size: int, mesh: Mesh, *, desc: str, progress: bool | None = None
) -> Iterator[tuple[int, Any, Any]]:
    """Yield ``(count, batch, weight)`` of :func:`padded_batches` over every stratum of
    ``data`` in order (one compiled shape per stratum), with one progress bar."""
    parts = [p for p in strata(data) if data_size(p)]  # a process may hold none of a bucket
    total = sum(num_batches(data_size(p), batch_size, mesh.devices.size) for p in parts)
    with tqdm(total=total, desc=desc, leave=False, disable=_disable(progress)) as bar:
        for part in parts:
            for _, count, batch, weight in padded_batches(part, batch_size, mesh):
                yield count, batch, weight
                bar.update(1)


def _disable(progress: bool | None):
    """tqdm's ``disable``: ``None`` (auto: off when not a terminal), or forced on/off."""
    return None if progress is None else not progress


def full_batches(data: Data, batch_size: int) -> list[tuple[float, Any]]:
    """``[(weight, batch)]`` covering every stratum of ``data`` exactly once, on device, with
    ``weight = |batch|/n`` (the mean loss over all ``n`` samples is ``sum weight *
    loss(batch)``; under JAX's multi-process runtime ``data`` is this process's rows and ``n``
    counts every process's). Per stratum, all batches but the last have ``batch_size`` rows;
    the last holds the remainder (so at most two shapes compile per stratum)."""
    n = global_size(data)
    out = []
    for part in strata(data):
        m = data_size(part)
        if not m:
            continue
        b = round_batch(batch_size, m, 1)
        host = jax.tree.map(np.asarray, part)
        for start in range(0, m, b):
            stop = min(m, start + b)
            out.append(
                (
                    (stop - start) / n,
                    jax.device_put(jax.tree.map(lambda x, s=slice(start, stop): x[s], host)),
                )
            )
    return out
