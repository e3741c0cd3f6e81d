"""The LLM loss by name (llm_bridge/loss.py) against a hand computation from logits, and its use
in effort (paper Eq. 12) and fine-tuning; the ``official`` effort scope and the warm-up on a
tiny random LLaMA (no download)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jaxrec.data import load_dataset, load_scores
from jaxrec.data.synthetic import make_synthetic
from jaxrec.errors import UserError
from llm_bridge import effort, finetune
from llm_bridge import loss as lm_loss
from llm_bridge.config import EffortConfig
from llm_bridge.model import add_lora, load_tokenizer_and_model
from llm_bridge.prompts import collate, encode_sample, user_sample
from tests.support import tiny_llama


# ----------------------------------------------------------------------------- hand computation
def _hand(logits, labels, name):
    """Per-sample losses written out token by token with math.log / math.exp."""
    out = []
    for b in range(len(labels)):
        terms = []
        for t in range(len(labels[b]) - 1):
            y = labels[b][t + 1]
            if y == -100:
                continue
            row = logits[b][t]
            log_z = math.log(sum(math.exp(v) for v in row))
            terms.append(log_z - row[y])
        if not terms:
            out.append(0.0)
        elif name == "response-sum":
            out.append(sum(terms))
        else:
            out.append(sum(terms) / len(terms))
    return out


def _toy():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 7, generator=gen)
    labels = torch.tensor(
        [
            [-100, -100, 4, 1, 2],  # 3 label tokens
            [-100, 3, 0, -100, -100],  # 2 (then right padding)
            [-100, -100, -100, -100, -100],  # none
        ]
    )
    return logits, labels


@pytest.mark.parametrize("name", lm_loss.LOSSES)
def test_sample_losses_match_a_hand_computation(name):
    logits, labels = _toy()
    ref = _hand(logits.tolist(), labels.tolist(), name)
    got = lm_loss.sample_losses(logits, labels, name)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-7)
    # the hand values are far apart between sum and mean (3 and 2 tokens)
    if name == "response-sum":
        mean = lm_loss.sample_losses(logits, labels, "response-mean")
        np.testing.assert_allclose(got[:2].numpy(), (mean[:2] * torch.tensor([3, 2])).numpy())


def test_batch_loss_reductions_by_hand():
    logits, labels = _toy()
    terms = []
    for b in range(2):
        for t in range(4):
            y = int(labels[b, t + 1])
            if y != -100:
                row = logits[b, t].tolist()
                terms.append(math.log(sum(math.exp(v) for v in row)) - row[y])
    value, weight = lm_loss.batch_loss(logits, labels, "response-mean")
    assert weight == 5 and float(value) == pytest.approx(sum(terms) / 5, rel=1e-6)
    # HF's causal-LM loss is the token-weighted mean: today's fine-tune loss, unchanged
    hf = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert float(value) == pytest.approx(float(hf), rel=1e-6)
    value, weight = lm_loss.batch_loss(logits, labels, "response-sum")
    assert weight == 3 and float(value) == pytest.approx(sum(terms) / 3, rel=1e-6)


def test_loss_names_and_labels():
    assert lm_loss.LOSSES == ("response-mean", "response-sum", "sequence-mean")
    assert [lm_loss.labels_every_token(n) for n in lm_loss.LOSSES] == [False, False, True]
    with pytest.raises(UserError, match="loss='mean'"):
        lm_loss.check_loss("mean")


def test_loss_is_a_cli_choice():
    from jaxrec.cli import build_parser

    parser = build_parser()
    for cmd in ("effort", "finetune"):
        args = parser.parse_args([cmd, "--loss", "sequence-mean"])
        assert args.loss == "sequence-mean"
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--loss", "token-mean"])
    args = parser.parse_args(["effort", "--scope", "official", "--warmup-steps", "3"])
    assert args.scope == "official" and args.warmup_steps == 3


# ----------------------------------------------------------------------------- on a tiny LLaMA
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_loss")
    data = make_synthetic(
        root / "data", n_users=11, n_items=30, n_clusters=3, min_len=2, max_len=8, seed=4
    )
    model_dir = tiny_llama(root / "model")
    tok, lm, _ = load_tokenizer_and_model(str(model_dir), device="cpu", dtype="float32")
    torch.manual_seed(0)
    lm = add_lora(lm)
    lm.eval()
    return {
        "root": root,
        "data": data,
        "ds": load_dataset(data),
        "model": str(model_dir),
        "tok": tok,
        "lm": lm,
    }


def _encode(env, rows, name):
    out = []
    for row in rows:
        hist, target = user_sample(env["ds"], int(row))
        out.append(
            encode_sample(
                env["tok"], hist, target, train_on_inputs=lm_loss.labels_every_token(name)
            )
        )
    return out


def _loop_norms(model, samples, params, name):
    """Reference: one sample at a time, full logits of the HF model, hand-reduced loss."""
    out = []
    for s in samples:
        logits = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
        labels = s["labels"]
        terms = [
            torch.logsumexp(logits[t], -1) - logits[t, labels[t + 1]]
            for t in range(len(labels) - 1)
            if labels[t + 1] != -100
        ]
        value = sum(terms) if name == "response-sum" else sum(terms) / len(terms)
        grads = torch.autograd.grad(value, params, allow_unused=True)
        out.append(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)))
    return torch.stack(out)


@pytest.mark.parametrize("name", lm_loss.LOSSES)
def test_effort_norms_under_each_loss_equal_the_loop(env, name):
    model = env["lm"]
    samples = _encode(env, range(5), name)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = _loop_norms(model, samples, params, name)
    b = collate(samples, env["tok"].pad_token_id, "left")
    got = effort.per_sample_grad_norms(
        model, b["input_ids"], b["attention_mask"], b["labels"], loss=name
    )
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)


def test_sequence_mean_labels_every_token(env):
    hist, target = user_sample(env["ds"], 0)
    s = _encode(env, [0], "sequence-mean")[0]
    assert s["labels"] == s["input_ids"]
    r = _encode(env, [0], "response-mean")[0]
    n_resp = len(env["tok"](target, add_special_tokens=False)["input_ids"]) + 1
    assert sum(x != -100 for x in r["labels"]) == n_resp


def test_official_scope_is_the_last_layer_v_proj_lora_b(env):
    model = env["lm"]
    regex = effort.scope_params(model, "official")
    chosen = effort.select_params(model, regex)
    assert list(chosen) == [
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    ]
    assert effort.scope_params(model, "lora") == ""
    assert effort.scope_params(model, "lora", "lora_A") == "lora_A"
    with pytest.raises(UserError, match="both choose"):
        effort.scope_params(model, "official", "lora_A")


def _cfg(env, out, **kw):
    base = dict(
        data=str(env["data"]),
        out=str(out),
        model=env["model"],
        batch_size=4,
        shard_size=6,
        device="cpu",
        dtype="float32",
        seed=0,
    )
    return EffortConfig(**{**base, **kw})


def test_effort_official_scope_with_warmup_equals_batch1_loop_over_that_matrix(env):
    """dealrec effort --scope official --warmup-steps 2 --loss sequence-mean: every user's score
    is the norm of the gradient w.r.t. layers.1.self_attn.v_proj.lora_B alone, as a batch-1
    autograd loop over that one matrix computes it on the same warmed-up LoRA."""
    out = env["root"] / "official" / "effort.npy"
    cfg = _cfg(
        env,
        out,
        scope="official",
        loss="sequence-mean",
        warmup_steps=2,
        warmup_batch_size=3,
        warmup_lr=1e-2,
    )
    assert effort.main(cfg) == 0
    scores, manifest = load_scores(out, kind="effort", dataset=env["ds"].fingerprint())
    assert manifest["options"]["param_names"] == [
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    ]
    assert manifest["loss"].startswith("sequence-mean")
    # reference: the same seeded LoRA, the same warm-up, then one sample at a time
    tok, lm, _ = load_tokenizer_and_model(env["model"], device="cpu", dtype="float32")
    torch.manual_seed(0)
    lm = add_lora(lm)
    steps = finetune.warmup(
        lm,
        tok,
        env["ds"],
        steps=2,
        batch_size=3,
        lr=1e-2,
        loss="sequence-mean",
        cutoff_len=512,
        seed=0,
    )
    assert len(steps) == 2
    lm.eval()
    b_mats = {n: p for n, p in lm.named_parameters() if "lora_B" in n}
    assert all(float(p.abs().max()) > 0 for p in b_mats.values())  # warmed up: B != 0
    target = b_mats["base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"]
    samples = _encode(env, range(env["ds"].n_users), "sequence-mean")
    ref = _loop_norms(lm, samples, [target], "sequence-mean")
    np.testing.assert_allclose(scores, ref.detach().numpy(), rtol=1e-4)
    # and it is not the all-LoRA score
    full = effort.main(
        _cfg(
            env,
            env["root"] / "all" / "effort.npy",
            loss="sequence-mean",
            warmup_steps=2,
            warmup_batch_size=3,
            warmup_lr=1e-2,
        )
    )
    assert full == 0
    all_scores = np.load(env["root"] / "all" / "effort.npy")
    assert (all_scores > scores * 1.01).all()


def test_warmup_is_seeded(env):
    def b_after(seed):
        tok, lm, _ = load_tokenizer_and_model(env["model"], device="cpu", dtype="float32")
        torch.manual_seed(0)
        lm = add_lora(lm)
        finetune.warmup(lm, tok, env["ds"], steps=1, batch_size=2, lr=1e-2, seed=seed)
        return torch.cat([p.detach().flatten() for n, p in lm.named_parameters() if "lora_B" in n])

    a, b, c = b_after(0), b_after(0), b_after(1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float((a - c).abs().max()) > 0


def test_finetune_loss_response_sum_weights_by_samples(env):
    model = env["lm"]
    samples = _encode(env, range(4), "response-sum")
    b = collate(samples, env["tok"].pad_token_id, "right")
    value, weight = finetune.micro_batch_loss(model, b, "response-sum")
    per = effort.per_sample_losses(
        model, b["input_ids"], b["attention_mask"], b["labels"], "response-sum"
    )
    assert weight == 4
    assert float(value) == pytest.approx(float(per.mean()), rel=1e-5)
