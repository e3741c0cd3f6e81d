"""The typed options of the influence engine: one frozen dataclass per inverse-HVP solver
(:class:`LissaOptions`, :class:`CGOptions`, :class:`ExactOptions`, :class:`ArnoldiOptions`) and
per attribution estimator that has options (:class:`KFACOptions`, :class:`EKFACOptions`,
:class:`TRAKOptions`, :class:`DataInfOptions`). The Python API takes them
(:func:`jaxrec.influence.inverse_hvp`, :func:`jaxrec.influence.attribution.fit`) and the
``dealrec influence`` / ``dealrec lds`` configs nest them (:mod:`jaxrec.config`,
:func:`jaxrec.config_io.nested`), so every entry point shares one definition, defaults and
help text. Standard library only (the command line's ``--help`` imports no JAX).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jaxrec.config_io import option


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


# the attribution estimators' options (the estimators: jaxrec.influence.kfac, .trak, .datainf)
Fisher = Literal["empirical", "gauss-newton", "sampled"]


@dataclass(frozen=True)
class KFACOptions:
    """K-FAC influence (George et al. 2018; Grosse et al. 2023) for Flax Dense layers."""

    fisher: Fisher = option(
        "empirical",
        "curvature: empirical (per-sample loss gradients), gauss-newton (exact, from output=), "
        "sampled (true Fisher by Monte Carlo, from output=)",
    )
    damping: float | None = option(
        None, "damping lam of every layer; None: damping_scale x the layer's mean eigenvalue"
    )
    damping_scale: float = option(0.1, "the heuristic's factor (kronfluence: 0.1)")
    seed: int = option(0, "PRNG seed of the sampled Fisher's draws")
    fit_batch_size: int = option(256, "samples per covariance batch")
    batch_size: int = option(4096, "training samples per scoring batch")
    query_batch_size: int = option(64, "query samples per gradient batch")


@dataclass(frozen=True)
class EKFACOptions(KFACOptions):
    """EK-FAC: K-FAC with its eigenvalues corrected to the curvature's diagonal in the
    Kronecker eigenbasis (George et al. 2018; Grosse et al. 2023)."""


@dataclass(frozen=True)
class TRAKOptions:
    """TRAK's projected Gauss-Newton influence (Park et al. 2023)."""

    dim: int = option(2048, "projection dimension k")
    seed: int = option(0, "PRNG seed of the projections (model m uses fold_in(seed, m))")
    damping: float = option(0.0, "added to the projected Gauss-Newton matrix's diagonal")
    batch_size: int = option(256, "training samples per per-sample-gradient batch")
    query_batch_size: int = option(64, "query samples per gradient batch")


@dataclass(frozen=True)
class DataInfOptions:
    """DataInf's closed-form inverse (Kwon et al. 2024, Eq. 5)."""

    damping: float | None = option(
        None, "damping lam_l of every block; None: damping_scale x the mean squared gradient entry"
    )
    damping_scale: float = option(0.1, "the paper's factor of the mean squared gradient entry")
    batch_size: int = option(4096, "training samples per scoring batch")
    grad_batch_size: int = option(64, "training samples per per-sample-gradient batch")
    query_batch_size: int = option(64, "query samples per gradient batch")


SOLVER_OPTIONS = {
    "lissa": LissaOptions,
    "cg": CGOptions,
    "exact": ExactOptions,
    "arnoldi": ArnoldiOptions,
}
