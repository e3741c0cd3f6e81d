"""What the tests share besides pytest fixtures (those live in conftest.py): the checkout's
paths, a runner on forced CPU devices and the small models the tests build as references.

* ``ROOT``, ``GAMES``, ``games_available``: the repository and the real Games data beside it.
* ``run_on_forced_devices``: a script in a fresh process on N forced CPU devices.
* A tiny random LLaMA (config built here, tokenizer trained here; no download):
  ``tiny_llama(folder)`` writes a Hugging Face model folder that
  :func:`llm_bridge.model.load_tokenizer_and_model` loads like any LLaMA folder: a byte-level BPE
  tokenizer trained in milliseconds on the prompt template and synthetic-style titles (it adds
  BOS, has EOS and no pad token, like LLaMA), and a 2-layer ``LlamaForCausalLM`` with random
  weights from a seed.
* The real SmolLM2 once: ``smollm2_folder(folder)`` saves the embedded GGUF, de-quantised, as a
  Hugging Face folder (the ``smollm2`` session fixture in conftest.py), so that the tests
  that need the real model beside a library call that loads the GGUF itself load it once.
* The official SASRec: a PyTorch transcription of the paper's code (github Linxyhaha/DEALRec
  ``code/prune/modules.py``, ``models.py``, ``trainers.py``), ``torch_from_flax`` to load the
  ``arch="official"`` Flax parameters into it, ``official_model`` and ``official_batch``.
* TIGER: the ``TINY`` T5 sizes, random unique codes, a semantic-ID file, random histories, a
  fine-tune config and the fine-tune / evaluate sections of the tiny ``dealrec run`` tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as tnn

from jaxrec.data import save_scores
from llm_bridge.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
GAMES = ROOT / ".." / "shared" / "data" / "games"


def games_available() -> bool:
    return (GAMES / "sequential_train.txt").is_file()


def run_on_forced_devices(script: str, devices: int, timeout: int = 600) -> dict:
    """Run the Python ``script`` in a fresh process on ``devices`` forced CPU devices; return
    the JSON object its last output line prints."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- tiny LLaMA
def _corpus() -> list[str]:
    from llm_bridge.prompts import INPUT_PREFIX, INSTRUCTION, TEMPLATE

    titles = [f"Game {i} of series {chr(65 + c)}{c}" for c in range(6) for i in range(1, 121)]
    return [
        TEMPLATE.format(instruction=INSTRUCTION, input=INPUT_PREFIX + "; ".join(titles[:5])),
        *titles,
        "the quick brown fox jumps over the lazy dog 0123456789",
    ]


def tiny_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``<s>`` (added as BOS), ``</s>``,
    ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama_model(vocab_size: int, *, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random ``LlamaForCausalLM`` (float32, eval mode) of the given size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger random weights than the 0.02 init, so gradients are not tiny
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.float().eval()


def tiny_llama(folder, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Write a tiny random LLaMA with its tokenizer to ``folder`` and return the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    model = tiny_llama_model(len(tok), seed=seed, hidden=hidden, layers=layers)
    tok.save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def smollm2_folder(folder) -> tuple[Path, dict]:
    """The embedded SmolLM2 GGUF loaded once by :func:`llm_bridge.model.load_tokenizer_and_model`
    (its default model) and saved as a float32 Hugging Face folder: the same weights and
    tokenizer, loaded in about a second instead of de-quantised again (about 20 CPU seconds a
    load). Returns ``(folder, info)``, ``info`` of the GGUF load."""
    from llm_bridge.model import load_tokenizer_and_model

    folder = Path(folder)
    tok, model, info = load_tokenizer_and_model("", device="cpu", dtype="float32")
    # the weights are de-quantised floats, but transformers keeps the GGUF "quantizer" and
    # refuses to save the model with it: a plain float32 LLaMA is what is saved
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok.save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, info


# ----------------------------------------------------------------------------- official SASRec
N_ITEMS, HIDDEN, HEADS, BLOCKS, MAX_LEN = 30, 16, 2, 2, 12


# modules.py / models.py of the official code, minus dropout (eval mode) and CUDA.
class LayerNorm(tnn.Module):
    def __init__(self, hidden_size, eps=1e-12):
        super().__init__()
        self.weight = tnn.Parameter(torch.ones(hidden_size))
        self.bias = tnn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.variance_epsilon)
        return self.weight * x + self.bias


class SelfAttention(tnn.Module):
    def __init__(self):
        super().__init__()
        self.num_attention_heads = HEADS
        self.attention_head_size = HIDDEN // HEADS
        self.all_head_size = HIDDEN
        self.query = tnn.Linear(HIDDEN, HIDDEN)
        self.key = tnn.Linear(HIDDEN, HIDDEN)
        self.value = tnn.Linear(HIDDEN, HIDDEN)
        self.dense = tnn.Linear(HIDDEN, HIDDEN)
        self.LayerNorm = LayerNorm(HIDDEN, eps=1e-12)

    def _transpose_for_scores(self, x):
        x = x.view(*x.size()[:-1], self.num_attention_heads, self.attention_head_size)
        return x.permute(0, 2, 1, 3)

    def forward(self, input_tensor, attention_mask):
        q = self._transpose_for_scores(self.query(input_tensor))
        k = self._transpose_for_scores(self.key(input_tensor))
        v = self._transpose_for_scores(self.value(input_tensor))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        probs = tnn.Softmax(dim=-1)(scores + attention_mask)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        ctx = ctx.view(*ctx.size()[:-2], self.all_head_size)
        return self.LayerNorm(self.dense(ctx) + input_tensor)


class PointWiseFeedForward(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d_1 = tnn.Conv1d(HIDDEN, HIDDEN, kernel_size=(1,))
        self.conv1d_2 = tnn.Conv1d(HIDDEN, HIDDEN, kernel_size=(1,))
        self.activation = tnn.ReLU()
        self.LayerNorm = LayerNorm(HIDDEN, eps=1e-12)

    def forward(self, input_tensor):
        h = self.activation(self.conv1d_1(input_tensor.transpose(1, 2)).transpose(1, 2))
        h = self.activation(self.conv1d_2(h.transpose(1, 2)).transpose(1, 2))
        return self.LayerNorm(h + input_tensor)


class Layer(tnn.Module):
    def __init__(self):
        super().__init__()
        self.attention = SelfAttention()
        self.intermediate = PointWiseFeedForward()

    def forward(self, hidden_states, attention_mask):
        return self.intermediate(self.attention(hidden_states, attention_mask))


class OfficialSASRec(tnn.Module):
    def __init__(self):
        super().__init__()
        self.item_embeddings = tnn.Embedding(N_ITEMS + 1, HIDDEN, padding_idx=0)
        self.position_embeddings = tnn.Embedding(MAX_LEN, HIDDEN)
        self.layer = tnn.ModuleList([Layer() for _ in range(BLOCKS)])
        self.LayerNorm = LayerNorm(HIDDEN, eps=1e-12)

    def finetune(self, input_ids):
        positions = torch.arange(input_ids.size(1)).unsqueeze(0).expand_as(input_ids)
        x = self.item_embeddings(input_ids) + self.position_embeddings(positions)
        x = self.LayerNorm(x)
        mask = (input_ids > 0).long().unsqueeze(1).unsqueeze(2)
        n = input_ids.size(1)
        subsequent = (torch.triu(torch.ones((1, n, n)), diagonal=1) == 0).unsqueeze(1).long()
        mask = (1.0 - (mask * subsequent).to(x.dtype)) * -10000.0
        for layer in self.layer:
            x = layer(x, mask)
        return x

    def cross_entropy(self, seq_out, pos_ids, neg_ids):  # trainers.Trainer.cross_entropy
        pos = self.item_embeddings(pos_ids).view(-1, HIDDEN)
        neg = self.item_embeddings(neg_ids).view(-1, HIDDEN)
        seq_emb = seq_out.reshape(-1, HIDDEN)
        pos_logits = torch.sum(pos * seq_emb, -1)
        neg_logits = torch.sum(neg * seq_emb, -1)
        istarget = (pos_ids > 0).view(-1).float()
        return torch.sum(
            -torch.log(torch.sigmoid(pos_logits) + 1e-24) * istarget
            - torch.log(1 - torch.sigmoid(neg_logits) + 1e-24) * istarget
        ) / (torch.sum(istarget) + 1e-24)


def torch_from_flax(params) -> OfficialSASRec:
    """The transcription holding the Flax parameters (Dense kernels are transposed)."""
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    m = OfficialSASRec().double()
    with torch.no_grad():
        m.item_embeddings.weight.copy_(t(params["item_emb"]["embedding"]))
        m.position_embeddings.weight.copy_(t(params["pos_emb"]["embedding"]))
        m.LayerNorm.weight.copy_(t(params["emb_ln"]["scale"]))
        m.LayerNorm.bias.copy_(t(params["emb_ln"]["bias"]))
        for i, layer in enumerate(m.layer):
            att, ffn = layer.attention, layer.intermediate
            for mod, name in [
                (att.query, "query"),
                (att.key, "key"),
                (att.value, "value"),
                (att.dense, "attn_out"),
            ]:
                mod.weight.copy_(t(params[f"{name}_{i}"]["kernel"]).T)
                mod.bias.copy_(t(params[f"{name}_{i}"]["bias"]))
            for mod, name in [(ffn.conv1d_1, "ffn_1"), (ffn.conv1d_2, "ffn_2")]:
                mod.weight.copy_(t(params[f"{name}_{i}"]["kernel"]).T[:, :, None])
                mod.bias.copy_(t(params[f"{name}_{i}"]["bias"]))
            for ln, name in [(att.LayerNorm, "attn_ln"), (ffn.LayerNorm, "ffn_ln")]:
                ln.weight.copy_(t(params[f"{name}_{i}"]["scale"]))
                ln.bias.copy_(t(params[f"{name}_{i}"]["bias"]))
    return m


def official_model():
    """A small ``arch="official"`` SASRec and parameters that look trained."""
    import jax

    from jaxrec.models import sasrec

    model = sasrec.SASRec(
        n_items=N_ITEMS, hidden=HIDDEN, blocks=BLOCKS, heads=HEADS, max_len=MAX_LEN, arch="official"
    )
    params = sasrec.init_params(model, jax.random.PRNGKey(3))
    # trained-looking LayerNorms and biases (the init has them at 1 / 0)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree_util.tree_unflatten(tree, leaves)


def official_batch(b=6, seed=0):
    """Left-padded next-item samples (lengths 0..8) and their official-rule negatives."""
    from jaxrec.models import sasrec

    rng = np.random.default_rng(seed)
    seqs = [
        rng.choice(np.arange(1, N_ITEMS + 1), size=n, replace=False) for n in [0, 2, 5, 9, 3, 7]
    ]
    seqs = seqs[:b]
    inputs = np.zeros((b, MAX_LEN), np.int32)
    targets = np.zeros((b, MAX_LEN), np.int32)
    for r, s in enumerate(seqs):
        if len(s) > 1:
            inputs[r, MAX_LEN - len(s) + 1 :], targets[r, MAX_LEN - len(s) + 1 :] = s[:-1], s[1:]
    neg = sasrec.sequence_negatives(0, np.arange(b), 0, targets, N_ITEMS, seqs)
    return {"inputs": inputs, "targets": targets, "negatives": neg}, seqs


# ----------------------------------------------------------------------------- TIGER
TINY = {
    "d_model": 16,
    "d_kv": 8,
    "d_ff": 32,
    "num_layers": 1,
    "num_decoder_layers": 2,
    "num_heads": 2,
}  # a tiny T5 where the size does not matter


def random_codes(n_items: int, sizes, seed: int = 0) -> np.ndarray:
    """``[n_items, len(sizes)]`` distinct random code tuples."""
    rng = np.random.default_rng(seed)
    space = int(np.prod(sizes))
    flat = rng.choice(space, size=n_items, replace=False)
    return np.stack(np.unravel_index(flat, sizes), 1).astype(np.int64)


def write_codes(path, ds, codes, sizes):
    """A semantic-ID file as ``dealrec semantic-ids`` writes it."""
    return save_scores(
        path,
        codes,
        kind="semantic_ids",
        dataset=ds.fingerprint(),
        codebook_sizes=[int(k) for k in sizes],
    )


def random_inputs(n_users: int, n_items: int, tokens, seed: int = 0):
    """Encoder inputs of ``n_users`` random histories (0 to 6 items)."""
    from llm_bridge.tiger import model as M

    rng = np.random.default_rng(seed)
    return [
        M.history_input(rng.integers(1, n_items + 1, rng.integers(0, 7)), tokens, 20)
        for _ in range(n_users)
    ]


# The fine-tune and evaluate sections of the tiny TIGER `dealrec run` tests (full-size T5, a
# few epochs; a seeded 16 of the users with test items evaluated: 20-beam search on every one
# of them made most of a run's time)
TIGER_FINETUNE = {
    "epochs": 2,
    "patience": 1,
    "lr": 1e-3,
    "batch_size": 16,
    "grad_accum": 1,
    "device": "cpu",
    "schedule": "cosine",
}
TIGER_EVALUATE = {"beams": 20, "batch_size": 16, "device": "cpu", "users": 16}


def ft_config(root, path, out, **kw) -> FinetuneConfig:
    """A TIGER fine-tune config on the ``syn`` fixture's files (tests/tiger/conftest.py)."""
    base = {
        "data": str(path),
        "backend": "tiger",
        "semantic_ids": str(root / "codes.npy"),
        "selection": str(root / "sel.npy"),
        "out": str(out),
        "epochs": 4,
        "patience": 10,
        "lr": 3e-3,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "batch_size": 16,
        "grad_accum": 1,
        "device": "cpu",
    }
    return FinetuneConfig(**{**base, **kw})
