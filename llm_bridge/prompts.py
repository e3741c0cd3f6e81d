"""BIGRec's Alpaca-style prompt for Games, one template for training, effort scoring and inference.

A user's training sample (paper Eq. 1) is: all train titles but the last -> the last title.
Rendered::

    Below is an instruction that describes a task, paired with an input that provides further
    context. Write a response that appropriately completes the request.

    ### Instruction:
    Given the game products that the user purchased before, please recommend a new game
    product that the user likes to the user.

    ### Input:
    The user has purchased the following game products before, with titles as: T1; T2; T3

    ### Response:
    TARGET</s>

(the first two paragraphs are one line each). Tokens: the prompt is tokenized with the
tokenizer's special tokens (BOS where it adds one), the response separately without them and
followed by EOS, so the prompt ids at inference are exactly the prompt ids of training. The
oldest titles are dropped until prompt + response fit in ``cutoff_len`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from jaxrec.errors import UserError

IGNORE = -100

INSTRUCTION = (
    "Given the game products that the user purchased before, please recommend a new "
    "game product that the user likes to the user."
)
INPUT_PREFIX = "The user has purchased the following game products before, with titles as: "
TITLE_SEP = "; "
TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def build_prompt(history_titles: list[str]) -> str:
    """The prompt of a user with these titles (oldest first), up to and including
    ``"### Response:\\n"``. An empty history gives the same template with no titles."""
    text = (INPUT_PREFIX + TITLE_SEP.join(history_titles)).rstrip()
    return TEMPLATE.format(instruction=INSTRUCTION, input=text)


def _prompt_ids(tokenizer, history_titles: list[str]) -> list[int]:
    return list(tokenizer(build_prompt(history_titles), add_special_tokens=True)["input_ids"])


def encode_sample(
    tokenizer: Any,
    history_titles: list[str],
    target_title: str | None,
    cutoff_len: int = 512,
    train_on_inputs: bool = False,
) -> dict:
    """Token ids, labels and attention mask of one sample (paper Eq. 1).

    Args:
      tokenizer: a Hugging Face tokenizer with an EOS token.
      history_titles: the user's titles, oldest first.
      target_title: the response; ``None`` = an inference prompt (no response, no EOS).
      cutoff_len: the most tokens of prompt + response; the oldest titles are dropped until the
        sample fits (a response longer than the room left is cut, keeping its EOS).
      train_on_inputs: labels on every token (the paper's code) instead of the response only.
    Returns:
      ``{"input_ids", "labels", "attention_mask"}`` as lists of ints; ``labels`` is ``-100``
      outside the loss.
    """
    response: list[int] = []
    if target_title is not None:
        response = list(tokenizer(target_title, add_special_tokens=False)["input_ids"])
        response.append(tokenizer.eos_token_id)
    titles = list(history_titles)
    prompt = _prompt_ids(tokenizer, titles)
    if len(prompt) + len(response) > cutoff_len and titles:
        # keep the largest number k of newest titles that fits (length grows with k)
        lo, hi = 0, len(titles) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(_prompt_ids(tokenizer, titles[-mid:])) + len(response) <= cutoff_len:
                lo = mid
            else:
                hi = mid - 1
        titles = titles[len(titles) - lo :]
        prompt = _prompt_ids(tokenizer, titles)
    if len(prompt) >= cutoff_len and response or len(prompt) > cutoff_len:
        raise UserError(
            f"cutoff_len {cutoff_len} is too short for the prompt template "
            f"({len(prompt)} tokens with no history)"
        )
    if len(prompt) + len(response) > cutoff_len:
        keep = cutoff_len - len(prompt)
        response = response[: keep - 1] + [tokenizer.eos_token_id]
    ids = prompt + response
    labels = list(ids) if train_on_inputs else [IGNORE] * len(prompt) + response
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def user_sample(dataset: Any, row: int) -> tuple[list[str], str] | None:
    """The training sample of the user on line ``row`` of ``sequential_train.txt``:
    ``(titles of all train items but the last, title of the last)``, or ``None`` when the
    user has no train item (no sample: see ``Dataset.has_sample``)."""
    items = dataset.train[row]
    if len(items) == 0:
        return None
    titles = [dataset.titles[int(i)] for i in items]
    return titles[:-1], titles[-1]


def valid_sample(dataset: Any, row: int) -> tuple[list[str], str] | None:
    """The valid-period sample of a user: all train titles -> the first valid item's title,
    or ``None`` when the user has no valid item."""
    if len(dataset.valid[row]) == 0:
        return None
    history = [dataset.titles[i] for i in dataset.train[row]]
    return history, dataset.titles[int(dataset.valid[row][0])]


def encode_users(
    tokenizer: Any,
    dataset: Any,
    rows: Iterable[int],
    *,
    cutoff_len: int,
    train_on_inputs: bool,
    split: str = "train",
) -> list[dict]:
    """Encoded samples of ``rows``: BIGRec training samples (``split="train"``, paper Eq. 1) or
    valid-period samples (``split="valid"``, users without valid items are skipped)."""
    out = []
    for row in rows:
        row = int(row)
        sample = user_sample(dataset, row) if split == "train" else valid_sample(dataset, row)
        if sample is None:
            continue
        history, target = sample
        out.append(
            encode_sample(
                tokenizer, history, target, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs
            )
        )
    return out


def collate(batch: list[dict], pad_id: int, padding_side: str = "right") -> dict:
    """Pad encoded samples into ``[B, T]`` int64 tensors: ``input_ids`` with ``pad_id``,
    ``labels`` (when the samples have them) with ``-100``, ``attention_mask`` with 0, on the
    given side."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    width = max(len(s["input_ids"]) for s in batch)
    fills = {"input_ids": pad_id, "labels": IGNORE, "attention_mask": 0}
    out: dict[str, list] = {key: [] for key in fills if key in batch[0]}
    for s in batch:
        n = width - len(s["input_ids"])
        for key in out:
            row = list(s[key])
            out[key].append(
                row + [fills[key]] * n if padding_side == "right" else [fills[key]] * n + row
            )
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
