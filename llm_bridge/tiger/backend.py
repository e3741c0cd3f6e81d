"""The TIGER backend object that the registry (:mod:`llm_bridge.backend`) returns for
``backend: tiger``: effort, fine-tune, evaluation and user representations of
:mod:`llm_bridge.tiger`."""

from __future__ import annotations

from llm_bridge.config import EffortConfig, EvaluateConfig, FinetuneConfig, UserRepsConfig
from llm_bridge.tiger import effort, evaluate, finetune, user_reps


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
        """:func:`llm_bridge.tiger.user_reps.run`."""
        return user_reps.run(cfg)


TIGER = Tiger()
