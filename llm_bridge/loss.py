"""The BIGRec LLM loss by name: one definition for ``dealrec finetune`` and ``dealrec effort``.

Three losses, chosen with ``loss=`` (``--loss``) on both commands:

* ``response-mean`` (the default): per sample, the **mean** next-token cross-entropy over its
  response tokens (the target title and EOS). The usual SFT loss; the project's default.
* ``response-sum``: per sample, the **sum** over its response tokens: paper Eq. 1 as printed
  (``L = - sum_t log P(y_t | x, y_<t)``).
* ``sequence-mean``: per sample, the mean over **every** token of prompt + response: the
  official code (``finetune.sh`` passes ``--train_on_inputs``; ``effort_score.py`` sets
  ``labels = input_ids``).

A micro-batch of fine-tuning reduces the per-token terms as the official code's HF Trainer
does for the ``*-mean`` losses (the mean over all label tokens of the micro-batch, which is the
per-sample mean for a batch of one) and as the mean over samples of the per-sample sums for
``response-sum``. Effort (paper Eq. 12) always uses the per-sample loss.

Departure from the official code: its per-sample mean in ``effort_util.py`` divides the sum by
the padded length minus one (``DataCollatorForSeq2Seq(pad_to_multiple_of=8)``, pads counted as
zero-loss positions), so up to 7 pad positions dilute the mean; here the divisor is the number
of label tokens.
"""

from __future__ import annotations

from typing import get_args

import torch

from jaxrec.errors import UserError
from llm_bridge.config import LOSS_HELP, LossName  # noqa: F401 - re-exported
from llm_bridge.prompts import IGNORE

LOSSES: tuple[str, ...] = get_args(LossName)
DESCRIPTION = {
    "response-mean": "per sample: mean next-token cross-entropy over the response tokens + EOS",
    "response-sum": "per sample: sum of next-token cross-entropy over the response tokens + EOS "
    "(paper Eq. 1)",
    "sequence-mean": "per sample: mean next-token cross-entropy over every token of prompt + "
    "response (the official code)",
}


def check_loss(loss: str) -> str:
    """``loss`` if it is one of :data:`LOSSES`; a :class:`UserError` naming ``loss=`` otherwise."""
    if loss not in LOSSES:
        raise UserError(f"loss={loss!r}: expected one of {', '.join(LOSSES)}")
    return loss


def labels_every_token(loss: str) -> bool:
    """Whether ``loss`` puts labels on the prompt tokens too (``encode_sample``'s
    ``train_on_inputs``): only ``sequence-mean``."""
    return check_loss(loss) == "sequence-mean"


def label_positions(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """``(rows, cols)`` of the positions ``t`` whose next token ``labels[:, t + 1]`` is a label
    (``!= -100``), shifted as in transformers; with ``attention_mask``, only positions that are
    real tokens (a label is never predicted from a left pad)."""
    target = labels[:, 1:]
    keep = target != IGNORE
    if attention_mask is not None:
        keep = keep & attention_mask[:, :-1].bool()
    return torch.nonzero(keep, as_tuple=True)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[K]`` float32 cross-entropy of ``logits [K, V]`` against ``targets [K]``."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def per_sample(tok_loss: torch.Tensor, rows: torch.Tensor, n: int, loss: str) -> torch.Tensor:
    """``[n]`` loss of each sample from its token terms (``tok_loss[k]`` belongs to sample
    ``rows[k]``): their sum (``response-sum``) or mean (``*-mean``); 0 for a sample without
    label tokens. Which tokens carry labels is set when the sample is encoded
    (:func:`labels_every_token`)."""
    check_loss(loss)
    total = torch.zeros(n, device=tok_loss.device, dtype=tok_loss.dtype).index_add_(
        0, rows, tok_loss
    )
    if loss == "response-sum":
        return total
    count = torch.zeros(n, device=tok_loss.device, dtype=tok_loss.dtype).index_add_(
        0, rows, torch.ones_like(tok_loss)
    )
    return total / count.clamp(min=1)


def sample_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: str,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B]`` per-sample ``loss`` of a causal LM's ``logits [B, T, V]`` and ``labels [B, T]``
    (``-100`` outside the loss; shifted by one as in transformers)."""
    rows, cols = label_positions(labels, attention_mask)
    tok = token_losses(logits[:, :-1][rows, cols], labels[:, 1:][rows, cols])
    return per_sample(tok, rows, len(labels), loss)


def batch_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: str,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """The fine-tuning loss of a micro-batch and its weight ``(value, weight)``.

    ``*-mean``: the mean over all label tokens of the batch (HF's causal-LM loss, as the official
    code's Trainer computes it; the per-sample mean for a batch of one), weight = label tokens.
    ``response-sum``: the mean over the batch's samples of their per-sample sums (Eq. 1),
    weight = samples. A weighted mean of the values over batches with these weights is the
    dataset loss.
    """
    rows, cols = label_positions(labels, attention_mask)
    tok = token_losses(logits[:, :-1][rows, cols], labels[:, 1:][rows, cols])
    if check_loss(loss) == "response-sum":
        return tok.sum() / max(len(labels), 1), len(labels)
    return tok.sum() / max(len(tok), 1), int(len(tok))
