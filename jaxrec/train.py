"""Train and evaluate the surrogate (SASRec, or any model of :mod:`jaxrec.models`): optax
Adam, jitted steps, orbax checkpoints.

``dealrec train-surrogate`` trains with early stopping on valid Recall@20, keeps the best
checkpoint and the latest one (so a killed run resumes where it stopped), and writes
``RUN_DIR/metrics.json``. ``load_surrogate(RUN_DIR)`` gives the trained model back as the pure
``loss`` / ``per_sample_loss`` pair the influence engine works on.

Speed: users are bucketed by sequence length and each batch is cut to the narrowest width in
``TRAIN_WIDTHS`` that holds it (``jaxrec.data.buckets``; exact: positions count from the right
and padding is masked), so a Games epoch does not pay for 50 positions per user when the mean
sequence has 6. ``batching="random"`` gives the paper code's plain shuffled batches instead.

The paper's protocol (github Linxyhaha/DEALRec ``code/prune/``) is the default:
``arch="official"``, ``negatives="sequence"``, ``loss_weighting="position"`` (see
:class:`jaxrec.config.SurrogateConfig` and :mod:`jaxrec.models.sasrec`). Departures: the
whole train sequence is used (the paper's ``SeqDataset`` drops the last train item as a
target), the ``"position"`` divisor is a constant (not each batch's count), batches are
length-bucketed, and the negatives come from JAX keys per (seed, epoch, user), not Python's
``random``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jaxrec.base import ArrayLike, Loss, Params, PerSampleLoss
from jaxrec.config import SurrogateConfig, SurrogateEvalConfig
from jaxrec.config_io import make_config
from jaxrec.data import Dataset, evaluation_arrays, left_pad, load_dataset, training_arrays
from jaxrec.data import write_json
from jaxrec.data.buckets import TRAIN_WIDTHS, target_lengths, width_of
from jaxrec.errors import UserError
from jaxrec.data.ranking import recall_ndcg
from jaxrec.data.scorefiles import environment
from jaxrec.metrics import mask_seen, topk_metrics
from jaxrec.models import sample_loss, sasrec, spec, spec_of, with_negatives
from jaxrec.models.spec import Model

#: ``(params, opt_state, batch, weights, rng) -> (params, opt_state, loss)``: one Adam step.
TrainStep = Callable[..., tuple[Params, optax.OptState, jax.Array]]


@dataclass
class Surrogate:
    """A trained surrogate: the model, its parameters and the data it was trained on."""

    model: object  # a Flax module of jaxrec.models (cfg.model)
    params: dict
    config: SurrogateConfig
    dataset: Dataset
    data: dict  # inputs / targets / negatives / index, one row per user (NumPy)
    loss: Loss
    per_sample_loss: PerSampleLoss
    sample_loss: PerSampleLoss  # per-user loss (jaxrec.models.sample_loss): the g_i of the scores

    def user_representations(self, params: Params, inputs: ArrayLike) -> jax.Array:
        """``[B, L] -> [B, hidden]``: hidden state at the newest position."""
        return spec_of(self.model).user_representations(self.model, params, inputs)


def user_representations(sur: Surrogate, batch_size: int = 1024) -> np.ndarray:
    """The surrogate's representation of every user ``[n_users, hidden]`` (float32): its
    hidden state at the newest position of the user's whole training sequence."""
    inputs = left_pad(sur.dataset.train, sur.config.max_len)
    batch_size = max(1, min(batch_size, len(inputs)))
    apply = jax.jit(sur.user_representations)
    out = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        pad = batch_size - len(batch)
        if pad:  # one compiled shape
            batch = np.concatenate([batch, np.zeros((pad, batch.shape[1]), batch.dtype)])
        out.append(np.asarray(apply(sur.params, batch))[: batch_size - pad])
    return np.concatenate(out).astype(np.float32)


def build_model(cfg: SurrogateConfig, n_items: int, ds: Dataset | None = None) -> Model:
    """The Flax model of ``cfg.model`` (registry :func:`jaxrec.models.spec`); DCRec builds its
    item graphs from ``ds``."""
    return spec(cfg.model).build(cfg, n_items, ds)


def loss_fns(cfg: SurrogateConfig, model: Model, arrays: dict) -> tuple[Loss, PerSampleLoss]:
    """The pure ``(loss, per_sample_loss)`` of ``model``; SASRec's under ``cfg.loss_weighting``
    (the ``"position"`` divisor is the mean number of target positions of ``arrays``)."""
    s = spec(cfg.model)
    if s.weighted:
        return s.make_loss_fns(
            model, cfg.loss_weighting, sasrec.positions_per_sample(arrays["targets"])
        )
    return s.make_loss_fns(model)


def training_data(
    cfg: SurrogateConfig, arrays: dict, ds: Dataset, epoch: int, seed: int | None = None
) -> dict:
    """Every user's batch arrays for ``epoch``: negatives under ``cfg.negatives`` (and
    BERT4Rec's masks) derived from (seed, row index, epoch), so any sample's loss can be
    recomputed on its own. ``seed`` defaults to ``cfg.seed``."""
    seed = cfg.seed if seed is None else seed
    return spec(cfg.model).training_data(arrays, seed, epoch, ds.n_items, cfg, ds.train)


def negative_draw(
    cfg: SurrogateConfig, arrays: dict, ds: Dataset
) -> Callable[[int], np.ndarray] | None:
    """``k -> negatives [n, L]``: draw ``k`` of the negatives of ``arrays``'s users (seed
    ``cfg.seed + k``, epoch 0, sampled as training samples them), the draws
    ``influence.negative_draws`` averages over; draw 0 is :func:`load_surrogate`'s fixed data.
    ``None`` for a model whose loss reads no sampled negatives (``ModelSpec.sampled_negatives``
    False: BERT4Rec, scored with its one fixed draw of cloze masks)."""
    if not spec(cfg.model).sampled_negatives:
        return None

    def draw(k: int) -> np.ndarray:
        return np.asarray(training_data(cfg, arrays, ds, 0, cfg.seed + k)["negatives"])

    return draw


def epoch_batches(
    lengths: np.ndarray,
    batch_size: int,
    max_len: int,
    rng: np.random.Generator,
    batching: str = "bucketed",
) -> list[tuple[np.ndarray, int]]:
    """Shuffled batches of row indices: ``[(rows, width), ...]``.

    ``batching="bucketed"``: users of one length bucket per batch, cut to the bucket's width;
    ``"random"``: plain shuffled batches (the paper's ``RandomSampler``), each cut to the
    narrowest width holding its longest row. Rows with no target are skipped (their loss is
    0). Each batch has exactly ``batch_size`` rows (-1 pads the last one), so jit compiles
    once per width.
    """
    batches = []
    widths = width_of(lengths, max_len, TRAIN_WIDTHS)
    if batching == "random":
        rows = rng.permutation(np.flatnonzero(lengths > 0))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = int(widths[chunk].max())
            chunk = np.concatenate([chunk, -np.ones(batch_size - len(chunk), chunk.dtype)])
            batches.append((chunk, width))
        return batches
    if batching != "bucketed":
        raise ValueError(f"batching must be 'bucketed' or 'random', got {batching!r}")
    for width in sorted(set(widths[lengths > 0])):
        rows = rng.permutation(np.flatnonzero((widths == width) & (lengths > 0)))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            chunk = np.concatenate([chunk, -np.ones(batch_size - len(chunk), chunk.dtype)])
            batches.append((chunk, int(width)))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def take_batch(arrays: dict, rows: np.ndarray, width: int) -> dict:
    """Rows ``rows`` (``-1`` = an all-padding row) of ``arrays``, cut to the last ``width``
    columns."""
    safe = np.maximum(rows, 0)
    real = (rows >= 0)[:, None]
    return {
        k: np.where(real, arrays[k][safe, -width:], 0) for k in ("inputs", "targets", "negatives")
    }


def make_train_step(
    model: Model,
    optimizer: optax.GradientTransformation,
    weighting: str = "sample",
    positions: float = 1.0,
) -> TrainStep:
    """A jitted Adam step on the dropout-on, row-weighted mean per-sample loss (a weighted
    model's under ``weighting`` / ``positions``, see :func:`loss_fns`).

    ``params`` and ``opt_state`` are donated: the step updates them in place, so a caller
    must not use the arrays it passed in after the call (every caller rebinds them). Without
    donation each step allocates and fills fresh parameter- and Adam-sized buffers: at 16x
    Games' items the donated step is 1.6x faster, at 1x the same (``bench/donation.py``)."""
    return partial(jax.jit, donate_argnums=(0, 1))(
        train_step_fn(model, optimizer, weighting, positions)
    )


def train_step_fn(
    model: Model,
    optimizer: optax.GradientTransformation,
    weighting: str = "sample",
    positions: float = 1.0,
) -> TrainStep:
    """The un-jitted step of :func:`make_train_step`, ``(params, opt_state, batch, weights,
    rng) -> (params, opt_state, loss)``: for callers that transform it further (``jax.vmap``
    over a stack of models, :func:`jaxrec.retrain.retrain_many`)."""
    s = spec_of(model)
    extra = (weighting, positions) if s.weighted else ()

    def step(params, opt_state, batch, weights, rng):
        def objective(p):
            per = s.train_per_sample(model, p, batch, rng, *extra)
            return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)

        value, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


@partial(jax.jit, static_argnums=0)
def _rank_batch(model, params, inputs, seen, truth):
    scores = spec_of(model).item_scores(model, params, inputs)
    return topk_metrics(mask_seen(scores, seen), truth, 20)


def evaluate(
    model: Model,
    params: Params,
    ds: Dataset,
    split: str,
    *,
    batch_size: int = 1024,
    max_len: int | None = None,
) -> dict[str, float]:
    """Full-ranking Recall@10/20 and NDCG@10/20 on ``split`` (train items masked; for test,
    valid items too)."""
    arrays = evaluation_arrays(ds, split, max_len or model.max_len)
    n = len(arrays["users"])
    hits, n_truth = [], []
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size)
        rows = np.where(rows < n, rows, n - 1)  # pad the last batch: one compile
        h, t = _rank_batch(
            model, params, arrays["inputs"][rows], arrays["seen"][rows], arrays["truth"][rows]
        )
        keep = min(batch_size, n - start)
        hits.append(np.asarray(h)[:keep])
        n_truth.append(np.asarray(t)[:keep])
    return recall_ndcg(np.concatenate(hits), np.concatenate(n_truth))


# ----------------------------------------------------------------------------- checkpoints
def _checkpointer():
    return ocp.StandardCheckpointer()


def save_checkpoint(path: Path, tree: Any) -> None:
    """Save a pytree with orbax, replacing any previous checkpoint at ``path`` atomically
    (orbax writes to a temporary folder and renames it when complete)."""
    ckpt = _checkpointer()
    ckpt.save(path.absolute(), tree, force=True)
    ckpt.wait_until_finished()


def restore_checkpoint(path: Path, like: Any) -> Any:
    """The pytree saved at ``path`` (structure, shapes and dtypes of ``like``), read by this
    process alone onto its first local device.

    Under JAX's multi-process runtime (``dealrec influence --coordinator``) every process
    reads the whole checkpoint for itself: orbax's default would place each leaf by the
    sharding it was saved with (device 0, which only process 0 holds: "Topology mismatch" on
    the others) and then wait for every process at a barrier (which the failed processes
    never reach). With one process this is orbax's default restore.
    """
    import orbax.checkpoint as ocp

    here = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=here, active_processes={here})
    ckpt = ocp.StandardCheckpointer(multiprocessing_options=alone)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=device), like
    )
    return ckpt.restore(path.absolute(), abstract)


# what a run's config.json without these keys was trained with (issue 10 changed the defaults)
_BEFORE_ARCH = {
    "arch": "kang",
    "negatives": "target",
    "loss_weighting": "sample",
    "batching": "bucketed",
}


def _read_run_config(run: Path) -> SurrogateConfig:
    cfg_file = run / "config.json"
    if not (run / "checkpoints" / "best").exists() or not cfg_file.is_file():
        raise UserError(f"{run}: no trained surrogate checkpoint (run dealrec train-surrogate)")
    values = json.loads(cfg_file.read_text())
    for key, old in _BEFORE_ARCH.items():  # a run trained before these options existed
        values.setdefault(key, old)
    return make_config(SurrogateConfig, values, str(cfg_file))


def load_surrogate(
    run_dir: str | Path, data: str | None = None, rows: tuple[int, int] | None = None
) -> Surrogate:
    """Load the best checkpoint of a run as a :class:`Surrogate`.

    ``data`` overrides the dataset folder recorded in the run. The returned ``data`` arrays
    carry the negatives of epoch 0 for the run's seed: the fixed loss the influence engine
    differentiates. ``rows = (a, b)``: ``data`` holds users ``a..b-1`` only (one process's
    share under JAX's multi-process runtime, :func:`jaxrec.influence.hosts.row_range`); their
    negatives and the loss (SASRec's ``position`` divisor is a mean over every user) are those
    of the whole data set.
    """
    run = Path(run_dir)
    cfg = _read_run_config(run)
    ds = load_dataset(data or cfg.data)
    model = build_model(cfg, ds.n_items, ds)
    like = spec(cfg.model).init_params(model, jax.random.PRNGKey(0))
    try:
        params = restore_checkpoint(run / "checkpoints" / "best", like)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"{run}: checkpoint does not match the dataset/model ({e})") from None
    arrays = training_arrays(ds, cfg.max_len)
    loss, per_sample_loss = loss_fns(cfg, model, arrays)
    if rows is not None:
        a, b = rows
        if not 0 <= a < b <= ds.n_users:
            raise UserError(f"rows {a}:{b}: need 0 <= a < b <= {ds.n_users}")
        arrays = {k: v[a:b] for k, v in arrays.items()}
    arrays = training_data(cfg, arrays, ds, 0)
    return Surrogate(model, params, cfg, ds, arrays, loss, per_sample_loss, sample_loss(model))


# ----------------------------------------------------------------------------- training
def train(cfg: SurrogateConfig, *, progress: bool = True) -> dict:
    """Train the surrogate (early stopping on valid Recall@20) and return ``metrics.json``."""
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.patience < 1:
        raise UserError("epochs, batch_size and patience must be >= 1")
    ds = load_dataset(cfg.data)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run / "checkpoints"
    model = build_model(cfg, ds.n_items, ds)
    optimizer = optax.adam(cfg.lr)
    params, opt_state, state = _start_or_resume(cfg, ds, model, optimizer, run)
    write_json(run / "config.json", dataclasses.asdict(cfg))
    arrays = training_arrays(ds, cfg.max_len)
    positions = sasrec.positions_per_sample(arrays["targets"])
    step = make_train_step(model, optimizer, cfg.loss_weighting, positions)
    rng = np.random.default_rng([cfg.seed, state["epoch"]])
    key = jax.random.PRNGKey(cfg.seed + 1)
    bad_epochs = state["epoch"] - state["best_epoch"]
    epochs = tqdm(
        range(state["epoch"] + 1, cfg.epochs + 1),
        desc="surrogate",
        unit="epoch",
        disable=not progress,
        initial=state["epoch"],
        total=cfg.epochs,
    )
    for epoch in epochs:
        t0 = time.perf_counter()
        data = training_data(cfg, arrays, ds, epoch)
        params, opt_state, key, epoch_loss = train_epoch(
            step, params, opt_state, key, data, cfg, rng
        )
        if not np.isfinite(epoch_loss):
            raise UserError(f"training diverged at epoch {epoch} (loss {epoch_loss}); lower --lr")
        record = {"epoch": epoch, "loss": epoch_loss, "seconds": round(time.perf_counter() - t0, 3)}
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            record["valid"] = evaluate(model, params, ds, "valid", max_len=cfg.max_len)
            if record["valid"]["recall@20"] > state["best_recall@20"]:
                state["best_recall@20"] = record["valid"]["recall@20"]
                state["best_epoch"] = epoch
                save_checkpoint(ckpt_dir / "best", params)
                bad_epochs = 0
            else:
                bad_epochs += cfg.eval_every
        state["history"].append(record)
        state["epoch"] = epoch
        state["seconds_train"] += record["seconds"]
        state["config"] = dataclasses.asdict(cfg)
        save_checkpoint(ckpt_dir / "latest", {"params": params, "opt_state": opt_state})
        write_json(run / "train_state.json", state)
        epochs.set_postfix(
            loss=f"{epoch_loss:.4f}",
            r20=f"{record.get('valid', {}).get('recall@20', float('nan')):.4f}",
            best=state["best_epoch"],
        )
        if bad_epochs >= cfg.patience:
            break
    return _final_metrics(model, restore_checkpoint(ckpt_dir / "best", params), ds, cfg, state, run)


def _start_or_resume(cfg: SurrogateConfig, ds: Dataset, model, optimizer, run: Path):
    """``(params, opt_state, state)``: fresh, or from ``RUN/checkpoints/latest`` when the run
    was made from the same dataset and config (and ``cfg.resume``)."""
    params = spec(cfg.model).init_params(model, jax.random.PRNGKey(cfg.seed))
    opt_state = optimizer.init(params)
    state = {
        "epoch": 0,
        "best_epoch": 0,
        "best_recall@20": -1.0,
        "history": [],
        "seconds_train": 0.0,
        "dataset": ds.fingerprint(),
    }
    state_file, latest = run / "train_state.json", run / "checkpoints" / "latest"
    if cfg.resume and state_file.is_file() and latest.exists():
        old = json.loads(state_file.read_text())
        if old.get("dataset") == ds.fingerprint() and old.get("config", {}) == dataclasses.asdict(
            cfg
        ):
            restored = restore_checkpoint(latest, {"params": params, "opt_state": opt_state})
            params, opt_state = restored["params"], restored["opt_state"]
            state = old
            print(f"resuming {run} after epoch {state['epoch']}", file=sys.stderr)
    return params, opt_state, state


def train_epoch(
    step: TrainStep,
    params: Params,
    opt_state: optax.OptState,
    key: jax.Array,
    data: dict,
    cfg: SurrogateConfig,
    rng: np.random.Generator,
) -> tuple[Params, optax.OptState, jax.Array, float]:
    """One pass over length-bucketed shuffled batches. Returns the new
    ``(params, opt_state, key, mean loss)``."""
    lengths = target_lengths(data)
    losses = []
    for rows, width in epoch_batches(lengths, cfg.batch_size, cfg.max_len, rng, cfg.batching):
        batch = take_batch(data, rows, width)
        weights = (rows >= 0).astype(np.float32)
        key, sub = jax.random.split(key)
        params, opt_state, value = step(params, opt_state, batch, weights, sub)
        losses.append(value)
    return params, opt_state, key, float(np.mean(jax.device_get(losses)))


def _final_metrics(model, best, ds: Dataset, cfg: SurrogateConfig, state: dict, run: Path) -> dict:
    """Valid/test metrics of the best checkpoint, written to ``RUN/metrics.json``."""
    trained = [h["seconds"] for h in state["history"]]
    metrics = {
        "valid": evaluate(model, best, ds, "valid", max_len=cfg.max_len),
        "test": evaluate(model, best, ds, "test", max_len=cfg.max_len),
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        # the first epoch includes jit compilation; report the steady state when we have it
        "seconds_per_epoch": float(np.median(trained[1:] if len(trained) > 1 else trained)),
        "dataset": ds.fingerprint(),
        "environment": environment(),
    }
    write_json(run / "metrics.json", metrics)
    return metrics


def main(cfg: SurrogateConfig) -> int:
    metrics = train(cfg)
    print(json.dumps(metrics, indent=2))
    return 0


def evaluate_main(cfg: SurrogateEvalConfig) -> int:
    """``dealrec evaluate-surrogate``: metrics of a run's best checkpoint."""
    sur = load_surrogate(cfg.run, cfg.data or None)
    out = {
        split: evaluate(sur.model, sur.params, sur.dataset, split, max_len=sur.config.max_len)
        for split in cfg.splits.split(",")
    }
    print(json.dumps(out, indent=2))
    if cfg.out:
        write_json(cfg.out, out)
    return 0


__all__ = [
    "Surrogate",
    "build_model",
    "evaluate",
    "load_surrogate",
    "loss_fns",
    "train",
    "train_epoch",
    "training_data",
    "user_representations",
    "with_negatives",
]
