"""``dealrec select``: read score files, check they belong to the dataset, write the subset.

Output: ``OUT`` (int64 row indices of ``sequential_train.txt``, sorted) and ``OUT`` with
``.json`` (kind ``selection``: method, options, seed, every input's path / sha256 / fingerprint,
and the group or cluster detail). Everything is checked before anything is written. Surrogate
scores and representations are score files in ``RUN_DIR`` that ``dealrec influence --score
KIND`` wrote; this command only reads files and imports neither JAX nor PyTorch.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from jaxrec.config import SelectConfig
from jaxrec.data import load_dataset, load_scores, save_scores
from jaxrec.data.dataset import sha256_file
from jaxrec.errors import ScoreFileError, UserError
from jaxrec.select import REQUIRES, SURROGATE_FILES, check_method, select
from jaxrec.select.stratified import check_n, Selection

LLM_REPRESENTATION_KINDS = ("llm_representation", "representation")


def _record(path: Path, manifest: dict) -> dict:
    return {
        "path": str(path),
        "kind": manifest.get("kind"),
        "sha256": sha256_file(path),
        "dataset": manifest.get("dataset"),
        "created": manifest.get("created"),
    }


def check_config(cfg: SelectConfig) -> None:
    """Every check that needs no file: method, the options' combination, output name (the
    range of each number is :class:`SelectConfig`'s own check)."""
    SelectConfig(**dataclasses.asdict(cfg))  # a config changed after construction
    check_method(cfg.method)
    if cfg.beta_rule == "rate" and cfg.beta != SelectConfig.beta:
        raise UserError(
            f"--beta {cfg.beta:g} is used only with --beta-rule fixed (the default, rate, "
            "takes CCS's beta from the pruning rate)"
        )
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
def surrogate_file(
    cfg: SelectConfig, name: str, fingerprint: dict
) -> tuple[np.ndarray, dict, Path]:
    """``(array, manifest, path)`` of a surrogate score file (``grand``, ``el2n``,
    ``representations``): ``--scores`` when given (GraNd / EL2N), else ``RUN/FILE`` as
    ``dealrec influence --score KIND`` writes it. Missing or made from another dataset is an
    error that names the command to run; nothing is computed here."""
    kind, filename = SURROGATE_FILES[name]
    path = (
        Path(cfg.scores) if cfg.scores and name != "representations" else Path(cfg.run) / filename
    )
    if not path.is_file():
        raise UserError(
            f"{path} not found; make it with: dealrec influence --score {kind} "
            f"--run {cfg.run or 'RUN_DIR'} --out {path}"
        )
    array, manifest = load_scores(path, kind=kind, dataset=fingerprint)
    if name == "representations" and (array.ndim != 2 or array.shape[0] != fingerprint["n_users"]):
        raise ScoreFileError(
            f"{path}: shape {array.shape}, expected ({fingerprint['n_users']}, hidden)"
        )
    return array, manifest, path


# ----------------------------------------------------------------------------- main
def run_select(cfg: SelectConfig) -> tuple[Selection, dict[str, dict]]:
    """Load and check every input of ``cfg``, then select. Returns ``(Selection, inputs)``
    where ``inputs`` maps each input name to its path / sha256 / fingerprint record."""
    check_config(cfg)
    ds = load_dataset(cfg.data)
    fp = ds.fingerprint()
    eligible = ds.has_sample  # a user without a training sample is never chosen
    if cfg.method != "all":
        if cfg.n > eligible.sum() and not eligible.all():
            raise UserError(
                f"n={cfg.n} is larger than the {int(eligible.sum())} users with a training "
                f"sample ({ds.n_users - int(eligible.sum())} of {ds.n_users} have none)"
            )
        check_n(cfg.n, ds.n_users)
    needs = set(REQUIRES[cfg.method])
    arrays: dict[str, np.ndarray] = {}
    inputs: dict[str, dict] = {}
    for name in ("influence", "effort"):
        if name in needs:
            path = Path(getattr(cfg, name))
            arrays[name], manifest = load_scores(path, kind=name, dataset=fp)
            inputs[name] = _record(path, manifest)
    for name in SURROGATE_FILES:
        if name in needs:
            arrays[name], manifest, path = surrogate_file(cfg, name, fp)
            inputs[name] = _record(path, manifest)
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
    sel = select(
        cfg.method,
        cfg.n,
        seed=cfg.seed,
        n_total=ds.n_users,
        lamda=cfg.lamda,
        groups=cfg.groups,
        hard_prune=cfg.hard_prune,
        beta=cfg.beta if cfg.beta_rule == "fixed" else None,
        clusters=cfg.clusters,
        eligible=eligible,
        **arrays,
    )
    inputs["data"] = {"path": str(ds.path), **fp}
    return sel, inputs


def main(cfg: SelectConfig) -> int:
    """``dealrec select``: write ``cfg.out`` and its manifest; return 0."""
    t0 = time.perf_counter()
    sel, inputs = run_select(cfg)
    seconds = time.perf_counter() - t0
    ds_fp = {"train_sha256": inputs["data"]["train_sha256"], "n_users": inputs["data"]["n_users"]}
    save_scores(
        cfg.out,
        sel.indices,
        kind="selection",
        dataset=ds_fp,
        options=dataclasses.asdict(cfg),
        seconds=seconds,
        method=cfg.method,
        seed=cfg.seed,
        n=int(sel.indices.size),
        inputs=inputs,
        selection=sel.info,
    )
    print(
        f"dealrec select: {cfg.method} chose {sel.indices.size} of {ds_fp['n_users']} users "
        f"-> {cfg.out} ({seconds:.2f} s)"
    )
    return 0
