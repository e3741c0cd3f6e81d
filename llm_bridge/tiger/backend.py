"""The TIGER backend object that the registry (:mod:`llm_bridge.backend`) returns for
``backend: tiger``: effort, fine-tune and evaluation of :mod:`llm_bridge.tiger`."""

from __future__ import annotations

from jaxrec.errors import UserError
from llm_bridge.config import EffortConfig, EvaluateConfig, FinetuneConfig, UserRepsConfig
from llm_bridge.tiger import effort, evaluate, finetune


class Tiger:
    """The TIGER backend (:class:`llm_bridge.backend.Backend`)."""

    name = "tiger"

    def effort(self, cfg: EffortConfig) -> int:
        """:func:`llm_bridge.tiger.effort.run`."""
        return effort.run(cfg)

    def finetune(self, cfg: FinetuneConfig) -> int:
        """:func:`llm_bridge.tiger.finetune.run`."""
        return finetune.run(cfg)

    def evaluate(self, cfg: EvaluateConfig) -> int:
        """:func:`llm_bridge.tiger.evaluate.run`."""
        return evaluate.run(cfg)

    def user_reps(self, cfg: UserRepsConfig) -> int:
        """TF-DCon's LLM half reads a text LLM's view of the users; TIGER's T5 over semantic
        IDs has none. Raises :class:`UserError` (``dealrec user-reps`` runs the BIGRec LLM)."""
        raise UserError(
            "user-reps: the TIGER backend has no LLM user representation; "
            "`dealrec user-reps` embeds the prompts with the BIGRec LLM (--model)"
        )


TIGER = Tiger()
