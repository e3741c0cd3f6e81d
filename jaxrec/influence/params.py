"""Parameter subsets: pick the leaves whose path matches a regex, so solvers see only them.

The paper scores one 64x64 layer of SASRec; this engine scores any subset (default: all). A
path is the leaf's dict keys joined by ``/``, e.g. ``ffn_2_1/kernel`` or ``item_emb/embedding``.
A pattern may also be a preset name of :data:`PRESETS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import jax

from jaxrec.base import Params
from jaxrec.errors import UserError

#: A function of ``(params, batch)`` (a loss): :meth:`ParamSubset.restrict` gives one back.
Fn = TypeVar("Fn", bound=Callable[..., Any])


# Named parameter subsets. "official": the one matrix the paper's code scores,
# ``item_encoder.layer.1.attention.dense.weight`` (code/prune/influence_score.py), the attention
# output projection of block 2; it is ``attn_out_1/kernel`` in both SASRec archs (Flax stores
# the transpose of the PyTorch weight: the same 4,096 parameters).
PRESETS = {"official": r"^attn_out_1/kernel$"}


def resolve_pattern(pattern: str) -> str:
    """A preset name (:data:`PRESETS`) -> its regex; anything else is returned unchanged."""
    return PRESETS.get(pattern or "", pattern or "")


def path_string(path: Iterable[Any]) -> str:
    """``(DictKey('a'), DictKey('b'))`` -> ``"a/b"`` (sequence indices as numbers)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def parameter_paths(params: Params) -> list[str]:
    """Every leaf path of ``params`` in flattening order."""
    return [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


class ParamSubset:
    """The leaves of ``params`` whose path matches ``pattern`` (``re.search``; empty = all; a
    name of :data:`PRESETS` stands for its regex).

    ``subset.params`` is a flat dict ``{path: array}`` (a pytree the solvers work on);
    ``subset.combine(sub)`` puts such a dict back into the full tree; ``subset.restrict(fn)``
    turns ``fn(params, batch)`` into ``fn(sub, batch)`` with the other leaves held fixed.
    """

    def __init__(self, params, pattern: str = ""):
        leaves, self._treedef = jax.tree_util.tree_flatten_with_path(params)
        self.pattern = resolve_pattern(pattern)
        paths = [path_string(p) for p, _ in leaves]
        try:
            rx = re.compile(self.pattern) if self.pattern else None
        except re.error as e:
            raise UserError(f"parameter filter {pattern!r} is not a valid regex ({e})") from None
        self._leaves = [leaf for _, leaf in leaves]
        self._index = [i for i, p in enumerate(paths) if rx is None or rx.search(p)]
        if not self._index:
            shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
            raise UserError(
                f"parameter filter {pattern!r} matches no parameter path (paths: {shown})"
            )
        self.paths = [paths[i] for i in self._index]
        self._restricted: dict = {}

    @property
    def params(self) -> dict:
        return {p: self._leaves[i] for p, i in zip(self.paths, self._index)}

    @property
    def size(self) -> int:
        return int(sum(self._leaves[i].size for i in self._index))

    def combine(self, sub: dict, rest: Params | None = None) -> Params:
        """The full parameter tree with the selected leaves taken from ``sub``.

        ``rest`` (optional) is a full tree supplying the unselected leaves (default: the
        tree this subset was built from)."""
        leaves = list(self._leaves if rest is None else jax.tree_util.tree_leaves(rest))
        for p, i in zip(self.paths, self._index):
            leaves[i] = sub[p]
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    def restrict(self, fn: Fn) -> Fn:
        """``fn(params, batch)`` -> ``fn_sub(sub, batch)`` over the subset only (the same
        function object for the same ``fn``, so jit caches keyed on it hit)."""
        if fn not in self._restricted:
            full = jax.tree_util.tree_unflatten(self._treedef, self._leaves)

            def fn_sub(sub, batch):
                return fn(self.combine(sub, full), batch)

            self._restricted[fn] = fn_sub
        return self._restricted[fn]

    def frozen(self, fn: Fn) -> Fn:
        """``fn(params, batch)`` over the full tree, differentiated in the subset only: the
        other leaves pass through ``jax.lax.stop_gradient``, so their gradients are zero
        (TracIn-CP over full checkpoints scored on one block). The same function object comes
        back for the same ``fn``."""
        key = ("frozen", fn)
        if key not in self._restricted:
            selected = set(self._index)

            def fn_frozen(params, batch):
                leaves, treedef = jax.tree_util.tree_flatten(params)
                leaves = [
                    x if i in selected else jax.lax.stop_gradient(x) for i, x in enumerate(leaves)
                ]
                return fn(jax.tree_util.tree_unflatten(treedef, leaves), batch)

            self._restricted[key] = fn_frozen
        return self._restricted[key]
