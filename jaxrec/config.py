"""Typed configuration: one dataclass per ``dealrec`` subcommand, one YAML file per experiment.

Every flag of every subcommand is a field here with its default. A config file under
``configs/`` holds one section per subcommand (``surrogate:``, ``influence:``, ...); its keys
override the defaults, and command-line flags override the file. An unknown section or key is
an error, never silently ignored. How a field is declared (:func:`~jaxrec.config_io.option`)
and how files and flags are read is in :mod:`jaxrec.config_io`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


from jaxrec.config_io import nested, option, tie
from jaxrec.errors import UserError
from jaxrec.influence_options import (
    SOLVER_OPTIONS,
    ArnoldiOptions,
    CGOptions,
    DataInfOptions,
    EKFACOptions,
    ExactOptions,
    KFACOptions,
    LissaOptions,
    TRAKOptions,
)

GAMES = "../shared/data/games"


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


Solver = Literal["lissa", "cg", "exact", "arnoldi"]
Convention = Literal["dealrec", "standard"]
Score = Literal["influence", "grand", "el2n", "representation"]
ScoreModel = Literal["trained", "early"]
SampleLoss = Literal["per-user", "training"]


def solver_options(
    cfg: InfluenceConfig | LdsConfig, solver: str = ""
) -> LissaOptions | CGOptions | ExactOptions | ArnoldiOptions:
    """The options object of ``solver`` (default ``cfg.solver``) in ``cfg``: its nested field
    of that name (``cfg.lissa``, ``cfg.cg``, ...). ``dealrec influence``, ``dealrec lds``
    and the Python API share these objects and their flat names (``steps``,
    ``lissa_batch_size``, ``tol``, ``maxiter``, ``rank``, ...)."""
    return getattr(cfg, solver or getattr(cfg, "solver"))  # noqa: B009 - LdsConfig has none


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
    # each solver's options: one typed object (jaxrec.influence's), set in a config file as a
    # mapping (lissa: {steps: 2000}) or by the flat names its flags and reuse keys use (steps,
    # lissa_batch_size, lissa_tol, repeats, rtol, chunk; tol, maxiter; exact_chunk; rank,
    # iterations); batch_size and seed are this config's own fields, copied in (config_io.tie)
    lissa: LissaOptions = nested(LissaOptions(), "LiSSA's options (solver lissa)")
    cg: CGOptions = nested(CGOptions(), "CG's options (solver cg)")
    exact: ExactOptions = nested(ExactOptions(), "the exact solver's options (solver exact)")
    arnoldi: ArnoldiOptions = nested(ArnoldiOptions(), "Arnoldi's options (solver arnoldi)")
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

    def __post_init__(self):
        tie(self)  # batch_size and seed into the solvers' options


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
    # the solver options: the objects of InfluenceConfig (dealrec influence), under its flat
    # names; the earlier lds spellings stay accepted (aliases) and name them in settings.json
    # and cache keys. LiSSA's seed is this config's seed; the other fields (lissa: repeats,
    # rtol, chunk; cg / exact / arnoldi: batch_size; arnoldi: seed; exact: chunk) are set in
    # the mapping only and keyed only when not at their defaults
    lissa: LissaOptions = nested(
        LissaOptions(),
        "LiSSA's options (lissa, lissa-small, the dealrec row)",
        {
            "steps": ("steps", "lissa_steps"),
            "batch_size": "lissa_batch_size",
            "tol": "lissa_tol",
            "seed": "seed",
        },
    )
    cg: CGOptions = nested(
        CGOptions(),
        "CG's options",
        {"tol": ("tol", "cg_tol"), "maxiter": ("maxiter", "cg_maxiter")},
    )
    exact: ExactOptions = nested(ExactOptions(), "the exact solver's options", {})
    arnoldi: ArnoldiOptions = nested(
        ArnoldiOptions(),
        "Arnoldi's options",
        {"rank": ("rank", "arnoldi_rank"), "iterations": ("iterations", "arnoldi_iterations")},
    )
    # the estimators' options: the objects attribution.fit takes, by the flat names of
    # before (fisher, kfac_damping_scale, trak_dim; kfac and ekfac share theirs, so does
    # datainf its damping_scale: set alike); their seed is this config's; added since
    # 2026-12-07, so they are left out of settings.json at their defaults
    kfac: KFACOptions = nested(
        KFACOptions(),
        "K-FAC's options (gauss-newton and sampled use the per-sample losses as the model "
        "output here)",
        {"fisher": "fisher", "damping_scale": "kfac_damping_scale", "seed": "seed"},
        since="2026-12-07",
    )
    ekfac: EKFACOptions = nested(
        EKFACOptions(),
        "EK-FAC's options",
        {"fisher": "fisher", "damping_scale": "kfac_damping_scale", "seed": "seed"},
        since="2026-12-07",
    )
    trak: TRAKOptions = nested(
        TRAKOptions(), "TRAK's options", {"dim": "trak_dim", "seed": "seed"}, since="2026-12-07"
    )
    datainf: DataInfOptions = nested(
        DataInfOptions(),
        "DataInf's options",
        {"damping_scale": "kfac_damping_scale"},
        since="2026-12-07",
    )
    bootstrap: int = option(2000, "bootstrap resamples of the validation users")
    level: float = option(0.95, "confidence level of the bootstrap interval")
    seed: int = option(0, "seed of the slice, subsets, validation-user choice and initialisation")
    compile_cache: str = option(
        "~/.cache/dealrec/jax", "JAX persistent compilation cache; empty = off"
    )

    def __post_init__(self):
        tie(self)  # seed into LiSSA's, K-FAC's and TRAK's options


__all__ = [
    "PrepareConfig",
    "SurrogateConfig",
    "SurrogateEvalConfig",
    "InfluenceConfig",
    "SelectConfig",
    "LdsConfig",
    "GAMES",
    "LissaOptions",
    "CGOptions",
    "ExactOptions",
    "ArnoldiOptions",
    "KFACOptions",
    "EKFACOptions",
    "TRAKOptions",
    "DataInfOptions",
    "SOLVER_OPTIONS",
    "solver_options",
]
