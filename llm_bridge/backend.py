"""The LLM backends behind ``dealrec effort``, ``finetune``, ``evaluate`` and ``user-reps``,
chosen by name (``backend:`` in the configs) from one registry.

A backend implements the four LLM stages of DEALRec (:class:`Backend`): effort scores (paper
Eq. 12), the few-shot fine-tune on a selection, the evaluation of the fine-tuned model, and the
LLM's user representations (TF-DCon's LLM half). The commands in :mod:`llm_bridge.effort`,
:mod:`llm_bridge.finetune`, :mod:`llm_bridge.evaluate` and :mod:`llm_bridge.user_reps` call
``get_backend(cfg.backend).<stage>(cfg)``.

To add a backend: write a module with an object that has the four methods, add its
``"module:attribute"`` to :data:`BACKENDS` and its name to ``llm_bridge.config.Backend``.
The registry holds import paths, not objects, so a command imports only the backend it runs
(TIGER's modules never load for BIGRec, nor peft for TIGER), and this module imports no other
module of ``llm_bridge``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

from jaxrec.errors import UserError

if TYPE_CHECKING:  # the configs, for the annotations only
    from llm_bridge.config import EffortConfig, EvaluateConfig, FinetuneConfig, UserRepsConfig


class Backend(Protocol):
    """An LLM recommender that DEALRec's LLM stages run on; each method is a command's work
    (it returns the exit status, 0, and raises :class:`UserError` for a bad input)."""

    name: str

    def effort(self, cfg: EffortConfig) -> int:
        """Write the effort score (Eq. 12) of every user's sample to ``cfg.out``."""
        ...

    def finetune(self, cfg: FinetuneConfig) -> int:
        """Fine-tune on ``cfg.selection``'s users; write the model to ``cfg.out``."""
        ...

    def evaluate(self, cfg: EvaluateConfig) -> int:
        """Write Recall/NDCG@K of the fine-tuned model on ``cfg.split`` to ``cfg.out``."""
        ...

    def user_reps(self, cfg: UserRepsConfig) -> int:
        """Write one LLM vector per user to ``cfg.out`` (TF-DCon's LLM half)."""
        ...


#: name -> ``"module:attribute"`` of the backend object.
BACKENDS: dict[str, str] = {
    "bigrec": "llm_bridge.bigrec:BIGREC",
    "tiger": "llm_bridge.tiger.backend:TIGER",
}


def get_backend(name: str) -> Backend:
    """The backend registered as ``name`` (its module imported on first use).

    Raises :class:`UserError` for a name not in :data:`BACKENDS`."""
    if name not in BACKENDS:
        raise UserError(f"backend={name!r}: expected one of {', '.join(BACKENDS)}")
    module, attribute = BACKENDS[name].split(":")
    backend: Backend = getattr(importlib.import_module(module), attribute)
    return backend
