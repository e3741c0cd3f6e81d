"""A tiny random LLaMA (config built here, tokenizer trained here; no download) for LLM tests.

``tiny_llama(folder)`` writes a Hugging Face model folder that
:func:`llm_bridge.model.load_tokenizer_and_model` loads like any LLaMA folder: a byte-level BPE
tokenizer trained in milliseconds on the prompt template and synthetic-style titles (it adds
BOS, has EOS and no pad token, like LLaMA), and a 2-layer ``LlamaForCausalLM`` with random
weights from a seed.
"""

from __future__ import annotations

from pathlib import Path


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
