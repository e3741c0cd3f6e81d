"""Run the paper's own surrogate trainer (github Linxyhaha/DEALRec, ``code/prune/``) on a
dataset folder, one valid/test evaluation per epoch, and write the curve as JSON.

    git -C MIRROR archive HEAD code/prune | tar -x -C /tmp/paper   # the official code
    OMP_NUM_THREADS=1 python bench/paper_surrogate.py --code /tmp/paper/code/prune \\
        --data ../shared/data/games --epochs 20 --json /tmp/paper_curve.json

What is the paper's and what is not:
- the model (``models.SASRecModel``), its initialisation, the data pipeline
  (``datasets_util.SeqDataset``: inputs ``train[:-2]``, targets ``train[1:-1]``, one negative
  per position outside the user's whole sequence, redrawn every epoch), the sampler, the
  optimiser (Adam 1e-3, batch 500), the loss (``trainers.cross_entropy``) and the evaluator
  (``FineTrainer.valid/test``) are imported from the official code unchanged, with its default
  arguments (``utils.get_args``; seed 42, CPU), except ``--seed`` (default 42, the official
  one) to see its seed-to-seed spread;
- the official ``surrogate.train`` evaluates every 5 epochs; this runs its loop body with this
  project's evaluator after every epoch (draws no random numbers) and the official evaluator
  every ``--official-every`` epochs (its datasets draw negatives from Python's ``random``, so
  with 5 the random stream is the official run's);
- the sequences come from this project's dataset folder (``sequential_train.txt`` etc.)
  instead of the official pickled ``training_dict.npy`` (never unpickled here); ids are already
  1-based, as the official loader makes them;
- ``pandas`` and ``ipdb`` (imported but unused by these code paths) are stubbed;
- the two evaluators: ``valid_official``/``test_official`` (masked items get score 0, so
  they can still rank; item 0 is rankable; a repeated truth item counts twice) and
  ``valid``/``test`` (:func:`jaxrec.train.evaluate`'s rule: masked items -inf, truth a set),
  so the curve compares with this project's trainer on the same footing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import numpy as np


def _import_official(code: Path):
    stubs = [n for n in ("pandas", "ipdb") if n not in sys.modules]
    for name in stubs:  # imported but unused by the official files
        sys.modules[name] = types.ModuleType(name)
    sys.path.insert(0, str(code))
    import datasets_util
    import models
    import trainers
    import utils

    for name in stubs:  # torch's lazy imports look modules up by spec: drop the stubs
        del sys.modules[name]
    return datasets_util, models, trainers, utils


def our_metrics(model, ds, split: str, max_len: int, torch) -> dict:
    """This project's full-ranking Recall/NDCG@10/20 of the torch model (same rule as
    :func:`jaxrec.train.evaluate`)."""
    from jaxrec.data import evaluation_arrays
    from jaxrec.data.ranking import recall_ndcg
    from jaxrec.metrics import mask_seen, topk_metrics

    arrays = evaluation_arrays(ds, split, max_len)
    table = model.item_embeddings.weight.detach()
    hits, n_truth = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(arrays["users"]), 1024):
            rows = slice(start, start + 1024)
            inputs = torch.as_tensor(arrays["inputs"][rows], dtype=torch.long)
            reps = model.finetune(inputs)[:, -1, :]
            scores = (reps @ table.T).numpy()
            h, t = topk_metrics(mask_seen(scores, arrays["seen"][rows]), arrays["truth"][rows], 20)
            hits.append(np.asarray(h))
            n_truth.append(np.asarray(t))
    return recall_ndcg(np.concatenate(hits), np.concatenate(n_truth))


def _official_dict(result) -> dict:
    """``computeTopNAccuracy`` output (topN [5, 10, 20, 50]) -> recall/ndcg @10/@20."""
    _, recall, ndcg, _ = result
    return {"recall@10": recall[1], "recall@20": recall[2], "ndcg@10": ndcg[1], "ndcg@20": ndcg[2]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--code", required=True, help="the official code/prune folder")
    p.add_argument("--data", default="../shared/data/games")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--json", required=True, help="curve output file")
    p.add_argument(
        "--official-every",
        type=int,
        default=5,
        help="also run the official evaluator (slow: ~100 s on a CPU) every N epochs",
    )
    p.add_argument("--seed", type=int, default=42, help="the official code's seed (default 42)")
    a = p.parse_args()

    from jaxrec.data import load_dataset

    ds = load_dataset(a.data)
    datasets_util, models, trainers, utils = _import_official(Path(a.code))
    import torch
    from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

    sys.argv = [sys.argv[0], "--no_cuda"]
    args = utils.get_args()  # the official defaults
    args.seed = a.seed
    utils.set_seed(args.seed)
    args.cuda_condition = False
    user_seq = [[int(i) for i in s] for s in ds.train]
    user_seq_val = [[int(i) for i in s] for s in ds.valid]
    user_seq_tst = [[int(i) for i in s] for s in ds.test]
    num_users, num_items = ds.n_users, ds.n_items + 1
    args.item_size = ds.n_items + 1
    args.tr_matrix = utils.generate_rating_matrix_valid(user_seq, num_users, num_items)
    args.tv_matrix = utils.generate_rating_matrix_test(user_seq_val, user_seq, num_users, num_items)

    train_ds = datasets_util.SeqDataset(args, user_seq, data_type="train")
    train_dl = DataLoader(train_ds, sampler=RandomSampler(train_ds), batch_size=args.batch_size)
    eval_ds = datasets_util.SeqDataset(args, user_seq_val, user_seq_tr=user_seq, data_type="valid")
    eval_dl = DataLoader(eval_ds, sampler=SequentialSampler(eval_ds), batch_size=args.batch_size)
    test_ds = datasets_util.SeqDataset(
        args, user_seq_tst, user_seq_tr=user_seq, user_seq_val=user_seq_val, data_type="test"
    )
    test_dl = DataLoader(test_ds, sampler=SequentialSampler(test_ds), batch_size=args.batch_size)
    model = models.SASRecModel(args)
    trainer = trainers.FineTrainer(model, train_dl, eval_dl, test_dl, args)

    history = []
    for epoch in range(a.epochs):
        t0 = time.perf_counter()
        loss = trainer.train(epoch)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        rec = {
            "epoch": epoch + 1,
            "loss": loss,
            "seconds": round(seconds, 2),
            "valid": our_metrics(model, ds, "valid", args.max_seq_length, torch),
            "test": our_metrics(model, ds, "test", args.max_seq_length, torch),
        }
        if (epoch + 1) % a.official_every == 0:
            rec["valid_official"] = _official_dict(trainer.valid(epoch))
            rec["test_official"] = _official_dict(trainer.test(0))
        rec["eval_seconds"] = round(time.perf_counter() - t1, 2)
        history.append(rec)
        print(json.dumps(rec), flush=True)
        out = {
            "source": "github Linxyhaha/DEALRec code/prune (official), defaults, CPU",
            "seed": a.seed,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "history": history,
        }
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
