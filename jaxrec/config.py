"""Typed configuration: one dataclass per ``dealrec`` subcommand, one YAML file per experiment.

Every flag of every subcommand is a field here with its default. A config file under
``configs/`` holds one section per subcommand (``surrogate:``, ``influence:``, ...); its keys
override the defaults, and command-line flags override the file. An unknown section or key is
an error, never silently ignored. This module imports the standard library and PyYAML only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import yaml

from jaxrec.errors import UserError

GAMES = "../shared/data/games"


_UNSET = object()


def option(
    default, text: str, flag: str = "", since: str = "", keyed_as=_UNSET, aliases: tuple = ()
):
    """A documented option field: ``text`` is its ``--help`` text. A list or dict default is
    copied for every instance (``default_factory``). ``flag`` (solver options) names the
    ``InfluenceConfig`` field, and so the command-line flag, that sets it when that name
    differs from the option's own. ``since`` (a date) marks an option added after runs were
    archived whose default keeps the earlier behaviour: while it is at its default it is left
    out of the stage's reuse key (:func:`jaxrec.pipeline.key_options`), so archived runs stay
    valid; any other value is keyed as usual. ``keyed_as`` marks an option that does not
    change a stage's results (resume, a cache folder): a reuse key holds this value whatever
    the option's, namely the default archived keys were made with, so the option and its
    default may change without invalidating them (:func:`keyed_value`). ``aliases`` are
    earlier names of a renamed option: config files and flags still accept them
    (:func:`make_config`, :func:`add_config_arguments`), and the first is its archived name."""
    metadata = {
        "help": text,
        **({"flag": flag} if flag else {}),
        **({"since": since} if since else {}),
        **({"keyed_as": keyed_as} if keyed_as is not _UNSET else {}),
        **({"aliases": tuple(aliases)} if aliases else {}),
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def keyed_value(f: dataclasses.Field, value):
    """The value a reuse key records for option field ``f`` set to ``value``: its
    ``keyed_as`` (:func:`option`) when it has one, else ``value``."""
    return f.metadata.get("keyed_as", value)


def help_of(cls, name: str) -> str:
    """The help text of field ``name`` of the dataclass ``cls``."""
    return cls.__dataclass_fields__[name].metadata["help"]


# ----------------------------------------------------------------------------- JAX side
@dataclass
class PrepareConfig:
    """``dealrec prepare``: raw Amazon review files -> a dataset folder."""

    reviews: str = option(
        "", "reviews file (.gz too): JSON lines of reviewerID, asin, overall, unixReviewTime"
    )
    meta: str = option(
        "", "item metadata file (.gz too): JSON or Python-literal lines of asin, title, categories"
    )
    out: str = option("data/prepared", "dataset folder to write")
    min_rating: float = option(4.0, "drop ratings below this")
    k_core: int = option(
        5, "users and items with fewer interactions are filtered, repeatedly, until none is left"
    )
    split: str = option("8:1:1", "train:valid:test ratios, cut by global time")


SurrogateArch = Literal["official", "kang"]
SurrogateNegatives = Literal["sequence", "target"]
SurrogateLossWeighting = Literal["position", "sample"]
SurrogateBatching = Literal["bucketed", "random"]


@dataclass
class SurrogateConfig:
    """``dealrec train-surrogate`` / ``evaluate-surrogate``: the Flax surrogate (SASRec by
    default; ``jaxrec.models`` lists the others)."""

    data: str = option(GAMES, "dataset folder")
    model: Literal["sasrec", "bert4rec", "gru4rec", "dcrec"] = option(
        "sasrec",
        "surrogate recommender: sasrec (paper), bert4rec (cloze, bidirectional), gru4rec (next "
        "item, GRU), dcrec (debiased contrastive, graph views)",
    )
    out: str = option(
        "runs/surrogate", "run folder (checkpoints, config.json, train_state.json, metrics.json)"
    )
    max_len: int = option(50, "sequence length: each user's last max_len items are the input")
    hidden: int = option(64, "hidden size (item embeddings and every layer)")
    blocks: int = option(2, "transformer blocks (gru4rec: unused, one GRU layer)")
    heads: int = option(2, "attention heads per block (gru4rec: unused)")
    dropout: float = option(0.5, "dropout rate during training")
    lr: float = option(1e-3, "Adam learning rate")
    batch_size: int = option(500, "users per training batch")
    epochs: int = option(200, "most training epochs (early stopping may end sooner)")
    patience: int = option(10, "epochs without a better valid Recall@20 before stopping")
    eval_every: int = option(
        1, "epochs between valid Recall@20 evaluations (and best-checkpoint updates)"
    )
    seed: int = option(0, "seed of the initial parameters, batch order, negatives and dropout")
    resume: bool = option(
        True,
        "continue from OUT's latest checkpoint if it has the same dataset and options",
        keyed_as=True,
    )
    arch: SurrogateArch = option(
        "official",
        "official: the paper code's post-LayerNorm (S3Rec/BERT-style) SASRec with its "
        "initialisation; kang: the pre-LayerNorm block of Kang & McAuley's SASRec",
    )
    negatives: SurrogateNegatives = option(
        "sequence",
        "sequence: each negative is drawn from the items outside the user's whole "
        "training sequence (the paper's code); target: any item but that position's target",
    )
    loss_weighting: SurrogateLossWeighting = option(
        "position",
        "position: every target position weighs the same (the paper code's "
        "cross_entropy); sample: each user's loss is the mean over its positions",
    )
    batching: SurrogateBatching = option(
        "bucketed",
        "bucketed: batches of users of similar length, each cut to its width (fast, "
        "exact); random: plain shuffled batches as the paper's code, each cut to its "
        "longest row",
    )
    mask_prob: float = option(
        0.2, "bert4rec: cloze masking probability per item (>= 1 masked per sample)"
    )
    # dcrec (authors' settings for Amazon Beauty/Sports, run_DCRec.py):
    dcrec_cl_weight: float = option(0.1, "dcrec: contrastive loss weight (graphcl_coefficient)")
    dcrec_cl_temp: float = option(1.0, "dcrec: contrastive temperature (cl_temp)")
    dcrec_graph_dropout: float = option(0.5, "dcrec: edge dropout of the graph encoders")
    dcrec_sim_k: int = option(
        4, "dcrec: similar items per item in the co-interaction graph (sim_group)"
    )


@dataclass
class SurrogateEvalConfig:
    """``dealrec evaluate-surrogate``: full-ranking metrics of a trained surrogate."""

    run: str = option("runs/surrogate", "trained surrogate run folder (its best checkpoint)")
    data: str = option("", "dataset folder; empty = the one the run was trained on")
    splits: str = option("valid,test", "comma-separated splits to evaluate")
    out: str = option("", "also write the metrics to this JSON file; empty = print only")


# ----------------------------------------------------------------------------- solver options
@dataclass(frozen=True)
class LissaOptions:
    """LiSSA (paper Algorithm 1): ``h <- v + (1 - d) h - H_t h / scale`` on PRNG minibatches."""

    steps: int = option(5000, "most LiSSA steps (minibatch HVPs per repeat)")
    batch_size: int = option(
        16,
        "samples per LiSSA minibatch HVP (all rows when >= n: the "
        "deterministic full-data recursion)",
        "lissa_batch_size",
    )
    repeats: int = option(1, "independent LiSSA runs, averaged (their spread gives rel_std)")
    seed: int = option(0, "PRNG seed of the minibatch draws")
    tol: float = option(
        1e-3,
        "convergence stop: once (1 - d)^t, the bound on what is left of the "
        "start-up transient, is below tol and the change of h per chunk "
        "has stopped shrinking (LiSSA's own noise floor); 0 = run all steps",
        "lissa_tol",
    )
    rtol: float = option(
        0.0, "also stop when the relative change of h over a chunk is below rtol; 0 = off"
    )
    chunk: int = option(250, "steps per compiled lax.scan chunk (checks run between chunks)")


@dataclass(frozen=True)
class CGOptions:
    """Conjugate gradient on full-data HVPs."""

    tol: float = option(1e-6, "CG stops at relative residual ||r|| / ||v|| <= tol")
    maxiter: int = option(100, "most CG iterations")
    batch_size: int = option(4096, "samples per full-data HVP batch")


@dataclass(frozen=True)
class ExactOptions:
    """Dense Hessian from HVPs, float64 NumPy solve (at most 20,000 parameters)."""

    batch_size: int = option(4096, "samples per full-data HVP batch")
    chunk: int = option(
        256, "basis vectors per batched HVP while building the Hessian", "exact_chunk"
    )


@dataclass(frozen=True)
class ArnoldiOptions:
    """Arnoldi low-rank inverse (Schioppa et al. 2022) on full-data HVPs."""

    rank: int = option(20, "Arnoldi eigenpairs kept")
    iterations: int = option(60, "Arnoldi iterations (Krylov basis size)")
    seed: int = option(0, "PRNG seed of the start vector")
    batch_size: int = option(4096, "samples per full-data HVP batch")


SOLVER_OPTIONS = {
    "lissa": LissaOptions,
    "cg": CGOptions,
    "exact": ExactOptions,
    "arnoldi": ArnoldiOptions,
}
Solver = Literal["lissa", "cg", "exact", "arnoldi"]
Convention = Literal["dealrec", "standard"]
Score = Literal["influence", "grand", "el2n", "representation"]
ScoreModel = Literal["trained", "early"]
SampleLoss = Literal["per-user", "training"]


def _same(cls, name: str, aliases: tuple = ()):
    """A config field with the default and help of option ``cls.name`` (``aliases``: its
    earlier names, as :func:`option`)."""
    f = cls.__dataclass_fields__[name]
    return option(f.default, f.metadata["help"], aliases=aliases)


def solver_options(cfg: InfluenceConfig | LdsConfig, solver: str = ""):
    """The option dataclass of ``solver`` (default ``cfg.solver``) filled from ``cfg``'s
    fields of the same names: ``dealrec influence`` and ``dealrec lds`` name every solver
    option alike (``steps``, ``lissa_batch_size``, ``tol``, ``maxiter``, ``rank``, ...)."""
    cls = SOLVER_OPTIONS[solver or getattr(cfg, "solver")]  # noqa: B009 - LdsConfig has none
    return cls(
        **{f.name: getattr(cfg, f.metadata.get("flag", f.name)) for f in dataclasses.fields(cls)}
    )


@dataclass
class InfluenceConfig:
    """``dealrec influence``: DEALRec influence scores (paper Eq. 9-11) of every user, or the
    GraNd / EL2N baselines' scores, from a trained surrogate (see docs/influence.md)."""

    run: str = field(default="runs/surrogate", metadata={"help": "trained surrogate run folder"})
    out: str = field(
        default="runs/surrogate/influence.npy",
        metadata={"help": "score file to write (.npy, plus a .json manifest)"},
    )
    data: str = field(
        default="", metadata={"help": "dataset folder; empty = the one recorded in the run"}
    )
    score: Score = field(
        default="influence",
        metadata={
            "help": "influence (Eq. 11), a baseline's per-sample score (grand: gradient norm, "
            "el2n: error norm), or representation: the surrogate's user vectors [n, hidden]"
        },
    )
    score_model: ScoreModel = field(
        default="trained",
        metadata={
            "help": "grand / el2n: trained = on the trained surrogate (DEALRec's 'same "
            "surrogate' setting); early = Paul et al. 2021: on --early-inits fresh surrogates "
            "(seeds seed, seed+1, ...) trained --early-epochs epochs, averaged"
        },
    )
    early_epochs: int = field(
        default=2,
        metadata={
            "help": "score-model early: epochs each fresh surrogate trains before scoring "
            "(0 = at initialisation, Paul et al.'s GraNd at init)"
        },
    )
    early_inits: int = field(
        default=10,
        metadata={"help": "score-model early: independent initialisations averaged (Paul: 10)"},
    )
    solver: Solver = field(default="lissa", metadata={"help": "inverse-HVP solver"})
    convention: Convention = field(
        default="dealrec",
        metadata={
            "help": "dealrec: scale (H + scale*damping I)^-1 v, what the paper's LiSSA converges "
            "to; standard: (H + damping I)^-1 v"
        },
    )
    params: str = field(
        default="",
        metadata={
            "help": "regex on parameter paths, or a preset: 'official' = '^attn_out_1/kernel$', "
            "the 64x64 block the paper's code scores (item_encoder.layer.1.attention.dense); "
            "empty = all parameters"
        },
    )
    negative_draws: int = field(
        default=32,
        metadata={
            "help": "influence: K fixed draws of negatives; the mean gradient, the HVPs and "
            "the per-sample scores use the loss averaged over them (1 = the surrogate's one "
            "draw; 32: Spearman 0.91 across draws on Games, 0.36 with 1, at 2.4x the time)"
        },
    )
    negative_seed: int = field(
        default=0,
        metadata={
            "help": "influence: draw k samples negatives with seed surrogate seed + "
            "negative_seed + k (0 = starting from the surrogate's own draw)"
        },
    )
    sample_loss: SampleLoss = option(
        "per-user",
        "influence: the loss whose gradient g_i scores user i (Eq. 11). per-user = that user's "
        "own loss as the paper code's trainer computes it on a batch of one (SASRec: the mean "
        "over the user's target positions, trainers.get_sample_loss); training = the user's "
        "term of the training loss (SASRec, loss_weighting position: the sum of its position terms "
        "over a constant). The mean gradient v and the HVPs always use the training loss",
    )
    damping: float = field(default=0.01, metadata={"help": "damping d of the inverse"})
    scale: float = field(
        default=25.0, metadata={"help": "LiSSA step 1/scale, and the dealrec convention's factor"}
    )
    steps: int = _same(LissaOptions, "steps")
    lissa_batch_size: int = _same(LissaOptions, "batch_size")
    repeats: int = _same(LissaOptions, "repeats")
    lissa_tol: float = _same(LissaOptions, "tol")
    rtol: float = _same(LissaOptions, "rtol")
    chunk: int = _same(LissaOptions, "chunk")
    tol: float = _same(CGOptions, "tol")
    maxiter: int = _same(CGOptions, "maxiter")
    exact_chunk: int = _same(ExactOptions, "chunk")
    rank: int = _same(ArnoldiOptions, "rank")
    iterations: int = _same(ArnoldiOptions, "iterations")
    batch_size: int = field(
        default=4096,
        metadata={
            "help": "samples per JVP / mean-gradient / full-data HVP batch (with K negative "
            "draws: batch_size // K users, the same memory)"
        },
    )
    grand_batch_size: int = field(
        default=64,
        metadata={
            "help": "samples per vmapped per-sample gradient batch (GraNd; memory batch x params)"
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "PRNG seed (LiSSA minibatches, Arnoldi; score-model early: the first "
            "initialisation's seed)"
        },
    )
    coordinator: str = option(
        "",
        "several processes (JAX's multi-process runtime): HOST:PORT of process 0's "
        "coordinator, or auto = what the cluster launcher sets (SLURM, Open MPI, Kubernetes; "
        "JAX_COORDINATOR_ADDRESS); empty = one process. Each process scores its own rows; "
        "process 0 writes the score file",
        since="2026-12-07",
    )
    num_processes: int = option(
        0, "with --coordinator: number of processes (0 = from the launcher)", since="2026-12-07"
    )
    process_id: int = option(
        -1, "with --coordinator: this process's index (-1 = from the launcher)", since="2026-12-07"
    )
    compile_cache: str = field(
        default="~/.cache/dealrec/jax",
        metadata={
            "help": "JAX persistent compilation cache folder (repeat runs skip compiling); "
            "empty = off"
        },
    )


@dataclass
class SelectConfig:
    """``dealrec select``: a few-shot subset (paper Eq. 13, Algorithm 2, and baselines)."""

    method: str = option(
        "dealrec",
        "selection method: dealrec, random, grand, el2n, ccs, tfdcon, recranker, greedy, "
        "influence-only, effort-only, or all (every user: full fine-tuning)",
    )
    data: str = option(GAMES, "dataset folder")
    influence: str = option(
        "", "influence score file (dealrec influence): dealrec, greedy, influence-only"
    )
    effort: str = option("", "effort score file (dealrec effort): dealrec, greedy, effort-only")
    run: str = option(
        "",
        "trained surrogate run folder, for grand / el2n / ccs / tfdcon / recranker (its score "
        "files from dealrec influence --score)",
    )
    scores: str = option("", "grand / el2n / ccs: this file instead of RUN/{grand,el2n}.npy")
    llm_reps: str = option(
        "", "tfdcon: optional LLM user representations [n_users, D] (.npy of dealrec user-reps)"
    )
    n: int = option(1024, "number of users to select (all: ignored)")
    lamda: float = option(
        0.3,
        "dealrec / greedy: effort weight of Eq. 13, S = minmax(influence) + lamda * minmax(effort)",
    )
    groups: int = option(
        50, "K strata of the score range (dealrec, ccs, influence-only, effort-only)"
    )
    hard_prune: float = option(
        0.1,
        "dealrec / influence-only / effort-only: first drop this top fraction by score",
    )
    beta_rule: Literal["rate", "fixed"] = option(
        "rate",
        "ccs hard cutoff: rate = from the pruning rate r = 1 - n/N as the CCS paper "
        "tunes it, beta = max(0, r - 0.6) (0.3 at r = 0.9); fixed = --beta",
    )
    beta: float = option(0.1, "ccs with --beta-rule fixed: drop this hardest (top EL2N) fraction")
    clusters: int = option(50, "tfdcon / recranker: k-means clusters")
    seed: int = option(0, "seed of every random draw (random, group members, k-means)")
    out: str = option("runs/selected.npy", "selection file to write (.npy, plus a .json manifest)")

    def __post_init__(self):
        """The range of every number (so ``dealrec run`` refuses them before any stage)."""
        for name in ("n", "groups", "clusters"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}: must be >= 1")
        if not self.lamda >= 0:
            raise UserError(f"lamda={self.lamda}: the effort weight of Eq. 13 must be >= 0")
        for name in ("hard_prune", "beta"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name}={getattr(self, name)}: must be in [0, 1)")


@dataclass
class LdsConfig:
    """``dealrec lds``: the linear datamodeling score of influence approximations (Ilyas et al.
    2022; Park et al. 2023) on a surrogate (see docs/influence.md, jaxrec/lds/)."""

    data: str = option(GAMES, "dataset folder")
    out: str = option(
        "runs/lds", "output folder (results.json/.md, lds.png, .npy caches: resumable)"
    )
    users: int = option(600, "seeded slice of this many users (0 = every user)")
    model: str = option("sasrec", "surrogate model (a SurrogateConfig model choice)")
    epochs: int = option(10, "training epochs of every (re)train (fixed: no early stopping)")
    dropout: float = option(0.2, "surrogate dropout")
    lr: float = option(1e-3, "Adam learning rate")
    batch_size: int = option(128, "training batch size")
    subsets: int = option(100, "number M of random training subsets (the protocol's 100)")
    alpha: float = option(0.5, "fraction of training users in each subset")
    seeds: int = option(2, "training seeds per subset; their validation losses are averaged")
    val_users: int = option(
        64, "validation users scored (a seeded choice; each costs one inverse-HVP per solver)"
    )
    attributions: list[str] = option(
        ["exact", "cg", "lissa", "lissa-small", "arnoldi", "grad-dot", "dealrec"],
        "attributions to compare: exact cg lissa lissa-small arnoldi grad-dot grad-cos kfac "
        "ekfac trak tracin datainf dealrec (jaxrec.lds.estimators)",
    )
    params: str = option(
        "official",
        "regex (or preset) of the parameter block every attribution works on ('official' = "
        "'^attn_out_1/kernel$', the paper's 64x64 block; exact needs at most 20,000 values; "
        "empty = all parameters, then drop exact)",
    )
    convention: Convention = option("dealrec", "damping convention of every inverse (as influence)")
    damping: float = option(
        0.01, "damping d of exact, CG, LiSSA, Arnoldi and DEALRec (the paper's)"
    )
    small_damping: float = option(0.001, "damping of the lissa-small attribution")
    negative_draws: int = option(
        InfluenceConfig.negative_draws,
        "dealrec row: negative draws of its score, as influence.negative_draws (the other "
        "attributions use the surrogate's one draw)",
    )
    sample_loss: SampleLoss = option(
        InfluenceConfig.sample_loss,
        "dealrec row: the loss whose gradient scores a user, as influence.sample_loss",
    )
    scale: float = option(25.0, "LiSSA step 1/scale, and the dealrec convention's factor")
    # the solver options under the names of InfluenceConfig (dealrec influence); the earlier
    # lds spellings stay accepted (aliases) and name them in settings.json and cache keys
    steps: int = option(5000, "most LiSSA steps per solve", aliases=("lissa_steps",))
    lissa_batch_size: int = option(16, "LiSSA minibatch size")
    lissa_tol: float = _same(LissaOptions, "tol")
    tol: float = _same(CGOptions, "tol", aliases=("cg_tol",))
    maxiter: int = _same(CGOptions, "maxiter", aliases=("cg_maxiter",))
    rank: int = _same(ArnoldiOptions, "rank", aliases=("arnoldi_rank",))
    iterations: int = _same(ArnoldiOptions, "iterations", aliases=("arnoldi_iterations",))
    fisher: Literal["empirical", "gauss-newton", "sampled"] = option(
        "empirical",
        "kfac / ekfac: the curvature (empirical Fisher of the per-sample losses; gauss-newton "
        "and sampled use the per-sample losses as the model output here)",
        since="2026-12-07",
    )
    kfac_damping_scale: float = option(
        0.1,
        "kfac / ekfac / datainf: damping = this x the layer's mean eigenvalue",
        since="2026-12-07",
    )
    trak_dim: int = option(2048, "trak: projection dimension k", since="2026-12-07")
    bootstrap: int = option(2000, "bootstrap resamples of the validation users")
    level: float = option(0.95, "confidence level of the bootstrap interval")
    seed: int = option(0, "seed of the slice, subsets, validation-user choice and initialisation")
    compile_cache: str = option(
        "~/.cache/dealrec/jax", "JAX persistent compilation cache; empty = off"
    )


# ----------------------------------------------------------------------------- machinery
def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add ``--config FILE`` and one ``--flag`` per field of the dataclass ``cls``."""
    parser.add_argument(
        "config_file",
        nargs="?",
        default=None,
        metavar="CONFIG",
        help="YAML config file (see configs/), the same as --config",
    )
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    for f in dataclasses.fields(cls):
        flags = ["--" + n.replace("_", "-") for n in (f.name, *f.metadata.get("aliases", ()))]
        typ = _field_type(cls, f)
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        text = f.metadata.get("help", "")
        text = f"{text} (default: {default!r})" if text else f"(default: {default!r})"
        if typ is bool:
            parser.add_argument(
                *flags, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=text
            )
        elif typing.get_origin(typ) is list:
            parser.add_argument(
                *flags,
                dest=f.name,
                default=None,
                nargs="+",
                type=typing.get_args(typ)[0],
                help=text,
            )
        elif typing.get_origin(typ) is typing.Literal:
            parser.add_argument(
                *flags, dest=f.name, default=None, choices=typing.get_args(typ), help=text
            )
        else:
            parser.add_argument(*flags, dest=f.name, default=None, type=typ, help=text)


def load_config_file(path: str | Path) -> dict:
    """Read a YAML config file into a dict of sections. A top-level ``base: FILE`` (relative to
    this file) is read first; this file's keys override it, section by section."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = load_config_file(path.parent / str(base))
    merged = {name: dict(section or {}) for name, section in parent.items()}
    for name, section in data.items():
        if not isinstance(section, dict):
            raise UserError(f"{path}: section {name!r} must be a mapping of keys")
        merged[name] = {**merged.get(name, {}), **section}
    return merged


def make_config(cls, values: dict | None = None, source: str = "config"):
    """Build ``cls`` from a dict, checking keys and types (an unknown key is an error)."""
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    for f in names.values():
        for alias in f.metadata.get("aliases", ()):
            if alias in values:
                if f.name in values:
                    raise UserError(f"{source}: {alias} and {f.name} name one option: give one")
                values[f.name] = values.pop(alias)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(names)})")
    for key, value in values.items():
        typ = _field_type(cls, names[key])
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif typing.get_origin(typ) is list:
            if not isinstance(value, list):
                raise UserError(f"{source}: {key} must be a list")
        elif typing.get_origin(typ) is typing.Literal:
            if value not in typing.get_args(typ):
                choices = ", ".join(map(str, typing.get_args(typ)))
                raise UserError(f"{source}: {key} must be one of {choices}, got {value!r}")
        elif typ in (int, float, str, bool) and not isinstance(value, typ):
            raise UserError(f"{source}: {key} must be {typ.__name__}, got {value!r}")
    try:
        return cls(**values)
    except UserError as e:  # a range check of the class (``__post_init__``)
        raise UserError(f"{source}: {e}") from None


def check_sections(data: dict, source: str, section: str, classes: dict) -> None:
    """Refuse a config file whose sections a command would silently ignore.

    Args:
      data: the file's sections (:func:`load_config_file`).
      source: the file's name, for messages.
      section: the section the command reads; it must be present (a file without it would
        run every default).
      classes: every section name a config file may hold -> its config class, or ``None``
        when the command cannot check it (``pipeline``, ``experiment``: ``dealrec run`` /
        ``experiment`` do). A name ``STAGE:KIND`` (a pipeline's score stage, e.g.
        ``influence:grand``) counts as ``STAGE``.

    Raises :class:`UserError` on an unknown section (with the closest known name), a missing
    ``section``, or an unknown key or bad value in any section whose class is known."""
    known = sorted(classes)
    unknown = sorted(name for name in data if str(name).partition(":")[0] not in classes)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(
            f"{source}: unknown section {unknown[0]!r}{hint}; known: {', '.join(known)}"
        )
    if section not in data:
        have = ", ".join(map(str, data)) or "none"
        raise UserError(
            f"{source}: no {section!r} section, the one this command reads (sections: {have}); "
            f"add '{section}:' or give the options as flags without the file"
        )
    for name, values in data.items():
        if values is not None and not isinstance(values, dict):
            raise UserError(f"{source}: section {name!r} must be a mapping of keys")
        cls = classes[str(name).partition(":")[0]]
        if cls is not None and name != section:
            make_config(cls, values or {}, f"{source} [{name}]")


def config_from_args(cls, args: argparse.Namespace, section: str, classes: dict | None = None):
    """Defaults <- section of the config file (``CONFIG`` or ``--config``) <- command-line
    flags. The file is checked by :func:`check_sections` against ``classes`` (default: only
    ``section``, of ``cls``)."""
    values: dict = {}
    path = getattr(args, "config", None)
    positional = getattr(args, "config_file", None)
    if path and positional and path != positional:
        raise UserError(f"two config files, {positional} and --config {path}: give one")
    path = path or positional
    if path:
        data = load_config_file(path)
        check_sections(data, str(path), section, classes or {section: cls})
        values.update(data.get(section) or {})
        source = f"{path} [{section}]"
    else:
        source = "config"
    for f in dataclasses.fields(cls):
        flag = getattr(args, f.name, None)
        if flag is not None:
            values[f.name] = flag
    return make_config(cls, values, source)


def flag_words(message: str, cls) -> str:
    """A library message for the command line: ``name=`` of a field of the config class
    ``cls`` becomes its flag, ``"increase damping="`` -> ``"increase --damping"``,
    ``"out='x'"`` -> ``"--out x"``; other names are left as they are."""
    names = [f.name for f in dataclasses.fields(cls)]
    if not names:
        return message

    def sub(m):
        value = m.group(2).strip("'")
        return "--" + m.group(1).replace("_", "-") + (f" {value}" if value else "")

    pattern = r"(?<![\w.\-])(" + "|".join(map(re.escape, names)) + r")=('[^']*'|[\w.+\-]*)"
    return re.sub(pattern, sub, message)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


__all__ = [
    "PrepareConfig",
    "SurrogateConfig",
    "SurrogateEvalConfig",
    "InfluenceConfig",
    "SelectConfig",
    "LdsConfig",
    "GAMES",
    "option",
    "help_of",
    "LissaOptions",
    "CGOptions",
    "ExactOptions",
    "ArnoldiOptions",
    "SOLVER_OPTIONS",
    "solver_options",
    "add_config_arguments",
    "check_sections",
    "keyed_value",
    "config_from_args",
    "flag_words",
    "load_config_file",
    "make_config",
    "to_dict",
]
