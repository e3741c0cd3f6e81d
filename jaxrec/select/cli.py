"""``dealrec select``: read score files, check they belong to the dataset, write the subset.

Output: ``OUT`` (int64 row indices of ``sequential_train.txt``, sorted) and ``OUT`` with
``.json`` (kind ``selection``: method, options, seed, every input's path / sha256 / fingerprint,
and the group or cluster detail). Everything is checked before anything is written. Surrogate
scores and representations are reused from ``RUN_DIR`` when their manifest matches the dataset,
else computed (this is the only place JAX is imported) and saved there.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from jaxrec.config import SelectConfig
from jaxrec.data import load_dataset, load_scores, save_scores
from jaxrec.data.dataset import sha256_file
from jaxrec.errors import ScoreFileError, UserError
from jaxrec.select import REQUIRES, check_method, select
from jaxrec.select.stratified import check_n

REPRESENTATION_KIND = "representation"
LLM_REPRESENTATION_KINDS = ("llm_representation", "representation")


def _record(path: Path, manifest: dict) -> dict:
    return {"path": str(path), "kind": manifest.get("kind"), "sha256": sha256_file(path),
            "dataset": manifest.get("dataset"), "created": manifest.get("created")}


def check_config(cfg: SelectConfig) -> None:
    """Every check that needs no file: method, n, groups, fractions, clusters, output name."""
    check_method(cfg.method)
    if cfg.n <= 0:
        raise UserError(f"--n must be >= 1, got {cfg.n}")
    if cfg.groups <= 0:
        raise UserError(f"--groups must be >= 1, got {cfg.groups}")
    if cfg.clusters <= 0:
        raise UserError(f"--clusters must be >= 1, got {cfg.clusters}")
    for name in ("hard_prune", "beta"):
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    if not cfg.out or Path(cfg.out).suffix != ".npy":
        raise UserError(f"--out must name a .npy file, got {cfg.out!r}")
    needs = set(REQUIRES[cfg.method])
    if "influence" in needs and not cfg.influence:
        raise UserError(f"method {cfg.method!r} needs --influence FILE")
    if "effort" in needs and not cfg.effort:
        raise UserError(f"method {cfg.method!r} needs --effort FILE")
    if needs & {"grand", "el2n"} and not (cfg.scores or cfg.run):
        raise UserError(f"method {cfg.method!r} needs --run RUN_DIR (or --scores FILE)")
    if "representations" in needs and not cfg.run:
        raise UserError(f"method {cfg.method!r} needs --run RUN_DIR")


# ----------------------------------------------------------------------------- surrogate inputs
def _cached(path: Path, kind: str, fingerprint: dict):
    """``(array, manifest)`` of ``path`` if it exists with a matching manifest, else ``None``."""
    if not path.is_file():
        return None
    try:
        return load_scores(path, kind=kind, dataset=fingerprint)
    except ScoreFileError as e:
        print(f"dealrec select: {e}; recomputing", file=sys.stderr)
        return None


def surrogate_scores(cfg: SelectConfig, kind: str, fingerprint: dict) -> tuple[np.ndarray, dict, Path]:
    """GraNd / EL2N scores: ``--scores`` (checked strictly), else ``RUN/{kind}.npy`` if its
    manifest matches, else computed by the influence engine and saved there."""
    if cfg.scores:
        path = Path(cfg.scores)
        array, manifest = load_scores(path, kind=kind, dataset=fingerprint)
        return array, manifest, path
    path = Path(cfg.run) / f"{kind}.npy"
    found = _cached(path, kind, fingerprint)
    if found is None:
        from jaxrec.config import InfluenceConfig
        try:
            from jaxrec.influence.cli import main as influence_main
        except ModuleNotFoundError as e:
            if e.name != "jaxrec.influence.cli":
                raise
            raise UserError(f"{path} is missing or stale and this build cannot compute it; run "
                            f"dealrec influence --score {kind} --run {cfg.run} --out {path}") from None
        influence_main(InfluenceConfig(run=cfg.run, out=str(path), score=kind, seed=cfg.seed))
        found = load_scores(path, kind=kind, dataset=fingerprint)
    return found[0], found[1], path


def compute_representations(run: str, data: str, batch_size: int = 1024) -> np.ndarray:
    """The surrogate's representation of every user ``[n_users, hidden]``: its hidden state at
    the newest position of the user's whole training sequence (JAX; imported here only)."""
    import jax

    from jaxrec.data import left_pad
    from jaxrec.train import load_surrogate

    sur = load_surrogate(run, data=data)
    inputs = left_pad(sur.dataset.train, sur.config.max_len)
    apply = jax.jit(sur.user_representations)
    out = []
    try:
        from tqdm.auto import tqdm
        starts = tqdm(range(0, len(inputs), batch_size), desc="representations", leave=False)
    except ImportError:  # pragma: no cover
        starts = range(0, len(inputs), batch_size)
    for start in starts:
        batch = inputs[start:start + batch_size]
        pad = batch_size - len(batch)
        if pad:  # one compiled shape
            batch = np.concatenate([batch, np.zeros((pad, batch.shape[1]), batch.dtype)])
        out.append(np.asarray(apply(sur.params, batch))[:batch_size - pad])
    return np.concatenate(out).astype(np.float32)


def surrogate_representations(cfg: SelectConfig, fingerprint: dict) -> tuple[np.ndarray, dict, Path]:
    """``RUN/user_representations.npy`` if its manifest matches, else computed and saved."""
    path = Path(cfg.run) / "user_representations.npy"
    found = _cached(path, REPRESENTATION_KIND, fingerprint)
    if found is None:
        t0 = time.perf_counter()
        reps = compute_representations(cfg.run, cfg.data)
        save_scores(path, reps, kind=REPRESENTATION_KIND, dataset=fingerprint,
                    options={"run": cfg.run, "position": "newest train item"},
                    seconds=time.perf_counter() - t0)
        found = load_scores(path, kind=REPRESENTATION_KIND, dataset=fingerprint)
    if found[0].ndim != 2 or found[0].shape[0] != fingerprint["n_users"]:
        raise ScoreFileError(f"{path}: shape {found[0].shape}, expected "
                             f"({fingerprint['n_users']}, hidden)")
    return found[0], found[1], path


# ----------------------------------------------------------------------------- main
def run_select(cfg: SelectConfig):
    """Load and check every input of ``cfg``, then select. Returns ``(Selection, inputs)``
    where ``inputs`` maps each input name to its path / sha256 / fingerprint record."""
    check_config(cfg)
    ds = load_dataset(cfg.data)
    fp = ds.fingerprint()
    if cfg.method != "all":
        check_n(cfg.n, ds.n_users)
    needs = set(REQUIRES[cfg.method])
    arrays, inputs = {}, {}
    for name in ("influence", "effort"):
        if name in needs:
            path = Path(getattr(cfg, name))
            arrays[name], manifest = load_scores(path, kind=name, dataset=fp)
            inputs[name] = _record(path, manifest)
    for name in ("grand", "el2n"):
        if name in needs:
            arrays[name], manifest, path = surrogate_scores(cfg, name, fp)
            inputs[name] = _record(path, manifest)
    if "representations" in needs:
        arrays["representations"], manifest, path = surrogate_representations(cfg, fp)
        inputs["representations"] = _record(path, manifest)
    if cfg.llm_reps:
        if cfg.method != "tfdcon":
            raise UserError(f"--llm-reps is used by tfdcon only, not {cfg.method!r}")
        path = Path(cfg.llm_reps)
        llm, manifest = load_scores(path, kind=LLM_REPRESENTATION_KINDS, dataset=fp)
        if llm.ndim != 2 or llm.shape[0] != ds.n_users:
            raise ScoreFileError(f"{path}: shape {llm.shape}, expected ({ds.n_users}, dim)")
        arrays["llm_representations"] = llm
        inputs["llm_representations"] = _record(path, manifest)
    if "interactions" in needs:
        arrays["interactions"] = np.array([len(t) for t in ds.train], dtype=np.int64)
    sel = select(cfg.method, cfg.n, seed=cfg.seed, n_total=ds.n_users, lamda=cfg.lamda,
                 groups=cfg.groups, hard_prune=cfg.hard_prune, beta=cfg.beta,
                 clusters=cfg.clusters, **arrays)
    inputs["data"] = {"path": str(ds.path), **fp}
    return sel, inputs


def main(cfg: SelectConfig) -> int:
    """``dealrec select``: write ``cfg.out`` and its manifest; return 0."""
    t0 = time.perf_counter()
    sel, inputs = run_select(cfg)
    seconds = time.perf_counter() - t0
    ds_fp = {"train_sha256": inputs["data"]["train_sha256"], "n_users": inputs["data"]["n_users"]}
    save_scores(cfg.out, sel.indices, kind="selection", dataset=ds_fp,
                options=dataclasses.asdict(cfg), seconds=seconds, method=cfg.method,
                seed=cfg.seed, n=int(sel.indices.size), inputs=inputs, selection=sel.info)
    print(f"dealrec select: {cfg.method} chose {sel.indices.size} of {ds_fp['n_users']} users "
          f"-> {cfg.out} ({seconds:.2f} s)")
    return 0
