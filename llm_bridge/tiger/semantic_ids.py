"""``dealrec semantic-ids``: TIGER's semantic IDs, one tuple of codes per item.

Each item's content embedding (:mod:`llm_bridge.tiger.content`) is quantised into ``levels``
codes of ``codebook_size`` values each, coarse to fine, by one of:

- ``rqvae`` (TIGER, Rajput et al. 2023): an MLP encoder (``D-512-256-128-32``, ReLU between
  layers, none at the end) maps the embedding to a latent ``z``; residual quantisation picks at
  level ``l`` the code nearest to the residual ``r_l`` (``r_0 = z``, ``r_{l+1} = r_l - e_l``);
  a mirrored decoder reconstructs the embedding from ``sum_l e_l``. Loss: reconstruction MSE +
  per level ``||sg[r_l] - e_l||^2 + beta ||r_l - sg[e_l]||^2`` (mean over elements),
  straight-through gradients, each level's codebook initialised by k-means on the residuals of
  all items, codes unused over an epoch reset to random current residuals, Adam.
- ``rkmeans``: k-means on the embeddings, then on the residuals, level by level (cheap;
  cornac reports it as good as the RQ-VAE).

Items sharing all ``levels`` codes (identical titles give identical embeddings, so some
collisions are real) get a last code ``0, 1, 2, ...`` in item-id order: every item has a unique
``levels + 1``-code ID. The output is a score file: ``[n_items, levels + 1]`` int64, row ``j``
= item ``j + 1``, with a manifest holding ``codebook_sizes`` (``[K] * levels + [max last + 1]``),
``collision_rate``, per-level ``perplexity`` and ``usage``, and ``reconstruction_mse``.

Departures from the paper: MiniLM (384-d) replaces Sentence-T5 (768-d), which is not installable
here; the RQ-VAE trains for far fewer epochs (paper: 20k, on a GPU) so that it runs in minutes on
a 2-core CPU; the per-level losses are means over elements rather than sums.
"""

from __future__ import annotations

from typing import Any

import itertools
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from jaxrec.data import Dataset, load_dataset, load_scores, save_scores
from jaxrec.errors import ScoreFileError, UserError
from llm_bridge.config import SemanticIdConfig
from llm_bridge.runtime import resolve_device_dtype
from llm_bridge.tiger.content import item_embeddings
from llm_bridge.tiger.model import CPU_THREADS, cpu_threads

KMEANS_ITERS = 25
# The fits are many small ops (1024 x 512 matmuls): on the shared 2-core machine two torch
# threads were 5-10x *slower* than one (thread synchronisation under load; measured in
# bench/tiger_semantic_ids.py), so they always run on one (DEALREC_TORCH_THREADS does not apply).


# ----------------------------------------------------------------------------- k-means
def _sq_dist(x, c):
    """``[n, k]`` squared Euclidean distances between rows of ``x`` and ``c`` (torch)."""
    return ((x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)).clamp_(min=0.0)


def _kmeans_pp(x, k: int, gen):
    """k-means++ seeding: ``k`` rows of ``x``; uniform picks once every point is a centre."""
    n = len(x)
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    d2 = _sq_dist(x, x[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            i = int(torch.multinomial(d2 / total, 1, generator=gen))
        else:
            i = int(torch.randint(n, (1,), generator=gen))
        centres.append(x[i])
        d2 = torch.minimum(d2, _sq_dist(x, x[i : i + 1]).squeeze(1))
    return torch.stack(centres)


def kmeans(
    x: torch.Tensor, k: int, *, gen: torch.Generator, iters: int = KMEANS_ITERS
) -> torch.Tensor:
    """Seeded k-means (k-means++ init, then Lloyd until assignments stop changing).

    Args:
      x: ``[n, d]`` float tensor (``n < k`` is allowed: some centres then repeat points).
      k: number of centres.
      gen: a seeded ``torch.Generator`` (on ``x``'s device).
      iters: at most this many Lloyd steps.
    Returns:
      ``[k, d]`` centres; an empty cluster keeps its previous centre.
    """
    x = x.detach()
    centres = _kmeans_pp(x, k, gen)
    assign = None
    for _ in range(iters):
        new = _sq_dist(x, centres).argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


def residual_kmeans(
    x: torch.Tensor, levels: int, k: int, *, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual k-means: k-means on ``x``, then on the residuals, ``levels`` times.

    Args:
      x: ``[n, d]`` float tensor (the item embeddings).
      levels, k: levels and centres per level.
      gen: a seeded ``torch.Generator``.
    Returns:
      ``(codebooks [levels, k, d], codes [n, levels] int64 tensor)``.
    """
    residual, books, codes = x.detach().clone(), [], []
    for _ in range(levels):
        centres = kmeans(residual, k, gen=gen)
        idx = _sq_dist(residual, centres).argmin(1)
        residual = residual - centres[idx]
        books.append(centres)
        codes.append(idx)
    return torch.stack(books), torch.stack(codes, 1)


# ----------------------------------------------------------------------------- RQ-VAE
def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def build_rqvae(
    in_dim: int, hidden: list[int], code_dim: int, levels: int, codebook_size: int
) -> nn.Module:
    """TIGER's RQ-VAE as a torch module.

    Args:
      in_dim: embedding width (384 for MiniLM; the paper's Sentence-T5 gives 768).
      hidden: encoder widths between input and latent (paper: 512, 256, 128).
      code_dim: latent and code width (paper: 32).
      levels, codebook_size: residual levels and codes per level (paper: 3 x 256).
    Returns:
      a module with ``encoder``, ``decoder`` and ``codebooks`` ``[levels, K, code_dim]``, whose
      ``quantize(z, beta)`` returns ``(z_q, codes [B, levels], residuals [levels, B, code_dim],
      quantisation loss)``.
    """

    class RQVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = _mlp([in_dim, *hidden, code_dim])
            self.decoder = _mlp([code_dim, *reversed(hidden), in_dim])
            self.codebooks = nn.Parameter(torch.zeros(levels, codebook_size, code_dim))

        def quantize(self, z, beta: float = 0.25):
            r, total, codes, residuals, loss = z, torch.zeros_like(z), [], [], z.new_zeros(())
            for book in self.codebooks:
                idx = _sq_dist(r.detach(), book.detach()).argmin(1)
                e = book[idx]
                loss = loss + ((r.detach() - e) ** 2).mean() + beta * ((r - e.detach()) ** 2).mean()
                codes.append(idx)
                residuals.append(r.detach())
                total = total + e
                r = r - e.detach()
            z_q = z + (total - z).detach()  # straight-through estimator
            return z_q, torch.stack(codes, 1), torch.stack(residuals), loss

    return RQVAE()


def _init_codebooks(model, x, gen) -> None:
    """Each level's codebook = k-means on the residuals of all items (untrained encoder)."""
    with torch.no_grad():
        books, _ = residual_kmeans(
            model.encoder(x), model.codebooks.shape[0], model.codebooks.shape[1], gen=gen
        )
        model.codebooks.copy_(books)


def _train_epoch(model, opt, x, batch_size: int, beta: float, gen):
    """One shuffled pass. Returns ``(recon MSE, total loss, usage [levels, K], last residuals)``."""
    levels, k, _ = model.codebooks.shape
    usage = torch.zeros(levels, k, dtype=torch.long, device=x.device)
    perm = torch.randperm(len(x), generator=gen, device=x.device)
    recon_sum = loss_sum = 0.0
    residuals = None
    for s in range(0, len(x), batch_size):
        xb = x[perm[s : s + batch_size]]
        z_q, codes, residuals, qloss = model.quantize(model.encoder(xb), beta)
        recon = ((model.decoder(z_q) - xb) ** 2).mean()
        loss = recon + qloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for level in range(levels):
            usage[level] += torch.bincount(codes[:, level], minlength=k)
        recon_sum += float(recon.detach()) * len(xb)
        loss_sum += float(loss.detach()) * len(xb)
    return recon_sum / len(x), loss_sum / len(x), usage, residuals


def _reset_dead_codes(model, usage, residuals, gen) -> int:
    """Codes unused over the epoch become random residuals of the last batch; returns how many."""
    dead_total = 0
    with torch.no_grad():
        for level in range(model.codebooks.shape[0]):
            dead = torch.nonzero(usage[level] == 0).squeeze(1)
            if len(dead):
                pick = torch.randint(
                    residuals.shape[1], (len(dead),), generator=gen, device=residuals.device
                )
                model.codebooks[level, dead] = residuals[level, pick]
                dead_total += len(dead)
    return dead_total


def train_rqvae(
    emb: np.ndarray, cfg: SemanticIdConfig, progress: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """Train TIGER's RQ-VAE on the item embeddings and read off each item's codes.

    Args:
      emb: ``[n_items, D]`` float32 item embeddings.
      cfg: hidden, code_dim, levels, codebook_size, epochs, batch_size, lr, beta, seed, device.
        The paper trains 20k epochs on a GPU; the default here is far fewer (CPU budget).
      progress: show a tqdm bar (one step per epoch, with the loss).
    Returns:
      ``(codes [n_items, levels] int64, {"reconstruction_mse": final, "history": per-epoch
      training reconstruction MSE, "dead_codes_reset": total})``.
    """

    device, _ = resolve_device_dtype(cfg.device, "float32")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    x = torch.as_tensor(emb, dtype=torch.float32, device=device)
    model = build_rqvae(
        x.shape[1], list(cfg.hidden), cfg.code_dim, cfg.levels, cfg.codebook_size
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history, resets = [], 0
    with cpu_threads(device, CPU_THREADS):
        _init_codebooks(model, x, gen)
        bar = tqdm(range(cfg.epochs), desc="rq-vae", unit="epoch", disable=not progress)
        for epoch in bar:
            recon, loss, usage, residuals = _train_epoch(
                model, opt, x, cfg.batch_size, cfg.beta, gen
            )
            history.append(round(recon, 8))
            if epoch < cfg.epochs - 1:
                resets += _reset_dead_codes(model, usage, residuals, gen)
            bar.set_postfix(loss=f"{loss:.5f}", recon=f"{recon:.5f}")
        codes, mse = _rqvae_codes(model, x, cfg.beta)
    return codes, {"reconstruction_mse": mse, "history": history, "dead_codes_reset": resets}


def _rqvae_codes(model, x, beta: float) -> tuple[np.ndarray, float]:
    """Codes and reconstruction MSE of every item under the trained model (no gradients)."""
    model.eval()
    with torch.no_grad():
        z_q, codes, _, _ = model.quantize(model.encoder(x), beta)
        mse = float(((model.decoder(z_q) - x) ** 2).mean())
    return codes.cpu().numpy().astype(np.int64), mse


def fit_rkmeans(emb: np.ndarray, cfg: SemanticIdConfig) -> tuple[np.ndarray, dict]:
    """Residual k-means codes (no training; ``hidden``/``code_dim``/``epochs`` are unused).

    Args:
      emb: ``[n_items, D]`` float32 item embeddings.
      cfg: levels, codebook_size, seed, device.
    Returns:
      ``(codes [n_items, levels] int64, {"reconstruction_mse": mean squared error of the sum of
      the chosen centres against the embedding})``.
    """

    device, _ = resolve_device_dtype(cfg.device, "float32")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    x = torch.as_tensor(emb, dtype=torch.float32, device=device)
    with cpu_threads(device, CPU_THREADS):
        books, codes = residual_kmeans(x, cfg.levels, cfg.codebook_size, gen=gen)
        recon = sum(books[level][codes[:, level]] for level in range(cfg.levels))
        mse = float(((recon - x) ** 2).mean())
    return codes.cpu().numpy().astype(np.int64), {"reconstruction_mse": mse}


# ----------------------------------------------------------------------------- IDs and stats
def add_collision_code(codes: np.ndarray) -> np.ndarray:
    """Append the code that separates items sharing all their codes.

    Args:
      codes: ``[n_items, L]`` int codes (row ``j`` = item ``j + 1``).
    Returns:
      ``[n_items, L + 1]`` int64: the last column numbers the items of each group of equal rows
      ``0, 1, 2, ...`` in item-id order, so every row is unique.
    """
    codes = np.asarray(codes, dtype=np.int64)
    _, group = np.unique(codes, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")  # item-id order within each group
    sorted_groups = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    last = np.empty(len(codes), dtype=np.int64)
    last[order] = np.arange(len(order)) - first
    return np.concatenate([codes, last[:, None]], axis=1)


def code_stats(ids: np.ndarray, codebook_size: int) -> dict:
    """Quality of semantic IDs ``[n_items, L + 1]`` (last column = collision code).

    Returns:
      ``codebook_sizes`` (``[K] * L + [max last + 1]``), ``collision_rate`` (fraction of items
      whose first ``L`` codes another, lower-numbered item already has, i.e. last code > 0),
      ``max_collisions`` (largest group of items sharing the first ``L`` codes), and per level
      ``perplexity`` (``exp`` of the entropy of the code distribution over items) and ``usage``
      (fraction of the ``K`` codes used).
    """
    levels = ids.shape[1] - 1
    perplexity, usage = [], []
    for level in range(levels):
        counts = np.bincount(ids[:, level], minlength=codebook_size)
        p = counts[counts > 0] / len(ids)
        perplexity.append(round(float(np.exp(-(p * np.log(p)).sum())), 3))
        usage.append(round(float((counts > 0).mean()), 4))
    return {
        "codebook_sizes": [codebook_size] * levels + [int(ids[:, -1].max()) + 1],
        "collision_rate": round(float((ids[:, -1] > 0).mean()), 5),
        "max_collisions": int(ids[:, -1].max()) + 1,
        "perplexity": perplexity,
        "usage": usage,
    }


# ----------------------------------------------------------------------------- file format
def vocab_sizes(manifest: dict) -> list[int]:
    """The number of values of each code position (``codebook_sizes`` of the manifest)."""
    return [int(v) for v in manifest["codebook_sizes"]]


def load_semantic_ids(path: str | Path, ds: Dataset) -> tuple[np.ndarray, dict]:
    """Load and check a ``dealrec semantic-ids`` file.

    Args:
      path: the ``.npy`` file.
      ds: the dataset it must belong to.
    Returns:
      ``(codes [n_items, L + 1] int64, manifest)``; row ``j`` is item ``j + 1``;
      ``vocab_sizes(manifest)`` gives the number of values per position.
    Raises:
      ScoreFileError (one line naming the file): wrong kind, another dataset, wrong shape,
      codes out of ``[0, codebook_sizes[l])``, or two items with the same ID.
    """
    codes, manifest = load_scores(path, kind="semantic_ids", dataset=ds.fingerprint())
    if (
        codes.ndim != 2
        or codes.shape[0] != ds.n_items
        or not np.issubdtype(codes.dtype, np.integer)
    ):
        raise ScoreFileError(
            f"{path}: shape {codes.shape} ({codes.dtype}), expected integer "
            f"codes [{ds.n_items}, levels + 1]"
        )
    sizes = manifest.get("codebook_sizes")
    if not isinstance(sizes, list) or len(sizes) != codes.shape[1]:
        raise ScoreFileError(
            f"{path}: manifest codebook_sizes {sizes!r} does not match "
            f"{codes.shape[1]} code columns"
        )
    if codes.min() < 0 or (codes >= np.asarray(sizes, dtype=np.int64)).any():
        raise ScoreFileError(f"{path}: codes outside [0, codebook_sizes) = {sizes}")
    if len(np.unique(codes, axis=0)) != len(codes):
        raise ScoreFileError(f"{path}: two items share a semantic ID (rows must be unique)")
    return codes.astype(np.int64), manifest


# ----------------------------------------------------------------------------- command
def _validate(cfg: SemanticIdConfig) -> None:
    """One-line :class:`UserError` for a bad setting, before any work."""
    if Path(cfg.out).suffix != ".npy":
        raise UserError(f"--out {cfg.out}: the semantic-ID file name must end in .npy")
    if cfg.method not in ("rqvae", "rkmeans"):
        raise UserError(f"--method {cfg.method}: expected rqvae or rkmeans")
    floors = {
        "levels": 1,
        "codebook_size": 2,
        "code_dim": 1,
        "epochs": 1,
        "batch_size": 1,
        "embed_batch_size": 1,
    }
    for name, floor in floors.items():
        if getattr(cfg, name) < floor:
            raise UserError(f"{name}={getattr(cfg, name)}: must be >= {floor}")
    if not cfg.lr > 0 or cfg.beta < 0:
        raise UserError(f"--lr must be > 0 and --beta >= 0, got lr={cfg.lr}, beta={cfg.beta}")
    if any(int(h) < 1 for h in cfg.hidden):
        raise UserError(f"--hidden widths must be >= 1, got {cfg.hidden}")
    if cfg.encoder and not Path(cfg.encoder).is_dir():
        raise UserError(
            f"--encoder {cfg.encoder}: not a folder (expected a local sentence-transformers folder)"
        )


def main(cfg: SemanticIdConfig, progress: bool = True) -> int:
    """``dealrec semantic-ids``: item embeddings -> codes -> unique IDs -> ``cfg.out``.

    Args:
      cfg: the command's settings (:class:`llm_bridge.config.SemanticIdConfig`).
      progress: show tqdm bars.
    Returns:
      0; the ``[n_items, levels + 1]`` int64 file and its manifest are written atomically, and
      nothing is written on bad input (one-line :class:`UserError`).
    """
    t0 = time.perf_counter()
    _validate(cfg)
    ds = load_dataset(cfg.data)
    if cfg.codebook_size > ds.n_items:
        raise UserError(
            f"codebook_size={cfg.codebook_size} is larger than the {ds.n_items} items of "
            f"{cfg.data}: most codes could never be used (and each adds a TIGER token); "
            f"choose at most {ds.n_items}"
        )
    emb, emb_info = item_embeddings(
        ds,
        encoder=cfg.encoder,
        cache_dir=cfg.cache_dir,
        batch_size=cfg.embed_batch_size,
        device=cfg.device,
        progress=progress,
        precision=getattr(cfg, "embed_precision", "float32"),
    )
    t1 = time.perf_counter()
    if cfg.method == "rqvae":
        codes, fit = train_rqvae(emb, cfg, progress)
    else:
        codes, fit = fit_rkmeans(emb, cfg)
    ids = add_collision_code(codes)
    stats = code_stats(ids, cfg.codebook_size)
    fit_seconds = time.perf_counter() - t1
    save_scores(
        cfg.out,
        ids,
        kind="semantic_ids",
        dataset=ds.fingerprint(),
        options=asdict(cfg),
        seconds=time.perf_counter() - t0,
        n_items=ds.n_items,
        **stats,
        reconstruction_mse=round(fit["reconstruction_mse"], 8),
        fit_seconds=round(fit_seconds, 3),
        training=fit,
        embeddings=emb_info,
    )
    print(
        f"semantic-ids: {ds.n_items} items, {cfg.method}, codebook sizes "
        f"{stats['codebook_sizes']}, collision rate {stats['collision_rate']:.4f}, perplexity "
        f"{stats['perplexity']}, recon MSE {fit['reconstruction_mse']:.6f}, "
        f"{fit_seconds:.1f} s -> {cfg.out}"
    )
    return 0
