"""TIGER fine-tuning's length-grouped batch order: a permutation, seeded, and with far less
padding than a plain shuffle (what makes an epoch on Games histories fast)."""

import numpy as np

from llm_bridge.tiger.finetune import length_grouped_order


def _padding(order, lengths, batch_size):
    batches = [lengths[order[i:i + batch_size]] for i in range(0, len(order), batch_size)]
    return sum(int(b.max()) * len(b) - int(b.sum()) for b in batches)


def test_length_grouped_order():
    lengths = np.random.default_rng(0).integers(1, 82, 5000)
    order = length_grouped_order(lengths, 64, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(5000))
    again = length_grouped_order(lengths, 64, np.random.default_rng(1))
    assert np.array_equal(order, again)
    plain = np.random.default_rng(1).permutation(5000)
    assert _padding(order, lengths, 64) < 0.1 * _padding(plain, lengths, 64)
    firsts = {int(order[i]) for i in range(0, 5000, 64)}
    other = length_grouped_order(lengths, 64, np.random.default_rng(2))
    assert firsts != {int(other[i]) for i in range(0, 5000, 64)}   # batches differ by seed
