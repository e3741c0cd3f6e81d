"""``dealrec experiment CONFIG``: selection methods x seeds (x a grid of swept options) through
fine-tune and evaluation, with a results table, significance tests and a plot.

The config file is a pipeline config (:mod:`jaxrec.pipeline`) plus an ``experiment:`` section
(:class:`ExperimentConfig`). The shared stages (surrogate, influence, semantic IDs, effort) run
once; then every *cell* (method, seed, grid point) runs select -> finetune -> evaluate in
``workdir/runs/CELL/`` (:func:`run_folder`: a grid point at the config's own value is the
un-swept run, so every study of one workdir shares it; a run whose folder holds another run,
of another study with other options, uses ``runs/CELL~KEY8/``,
:mod:`jaxrec.experiment.folders`). A finished cell is reused, so an
interrupted experiment continues where it stopped, and ``--methods`` / ``--seeds`` run a part
of it now and the rest later; the tables always cover every finished cell of the config. With
``experiment.archive`` a finished cell also lives outside the workdir (:mod:`jaxrec.archive`,
small enough to commit), and a cell archived there is not rerun after its workdir is gone
(whatever ``--workdir``: reuse keys do not depend on it). The evaluation users are the same for
every run (``evaluate.seed`` is not varied).

The headline is seed-level (:mod:`jaxrec.experiment.stats`; issue 23): within one seed all users
share one selected subset and one fine-tuned model, so the seed is the unit of evidence about a
method. Per method and grid point: each metric's mean over seeds with a 95 % t-interval; the
metrics are Recall/NDCG@10/20 and the test loss (the mean over the evaluated users of the
fine-tuned model's loss of the test target), co-primary. Per comparison with the baseline
(``experiment.baseline``, ``random`` by default; the paper's Fig. 4 compares its ablations with
``dealrec``) at the same grid point: the difference of the means with its 95 % interval,
Welch's t-test over seeds (the arms share no data, so no pairing by seed), the minimum
detectable difference at the observed spread and, with ``experiment.bootstrap``, a cluster
bootstrap over seeds and users. One seed: "one seed: no test". Below, per-user paired t-tests
and Wilcoxon tests (each user's metric averaged over the seeds both methods ran), labelled as
what they are: conditional on the trained models, not evidence about a method.

Methods may run different seeds (``experiment.seeds_of``). Before any stage starts the command
says how many runs it asked for are archived, finished and to run, and about how long. Several
processes (on one machine, or on several sharing the workdir's storage) may run one experiment
at once: each run is taken under a lock file (:mod:`jaxrec.experiment.locks`), the shared
stages run in one process while the others wait.

Outputs in ``workdir`` (or ``workdir/studies/NAME``): ``results.md``, ``results.csv`` (one row
per method and grid point: mean, std and 95 % interval over seeds, seconds per stage),
``runs.csv`` (one row per run), ``ttest.csv`` (the seed-level comparisons), ``usertest.csv``
(over users) and ``results.png``.

Modules, by job: :mod:`~jaxrec.experiment.grid` (the ``experiment:`` section, the command line,
the cells and their checks), :mod:`~jaxrec.experiment.folders` (run folders: a run never
reuses or overwrites another run's), :mod:`~jaxrec.experiment.rows` (a finished run's results,
per-user arrays, user groups, archiving), :mod:`~jaxrec.experiment.stats`,
:mod:`~jaxrec.experiment.tables` (CSV, Markdown), :mod:`~jaxrec.experiment.plots`,
:mod:`~jaxrec.experiment.locks` and :mod:`~jaxrec.experiment.run` (``main``).
"""

from jaxrec.experiment.grid import (
    METRICS,
    Cell,
    ExperimentArgs,
    ExperimentConfig,
    baseline_of,
    check_sweep,
    chosen_points,
    experiment_cells,
    read_experiment,
    selected_cells,
    shared_reads,
)
from jaxrec.experiment.folders import place_run, run_folder, spare_folder, wire_cell
from jaxrec.experiment.plots import bar_plot
from jaxrec.experiment.rows import (
    archive_run,
    cell_row,
    group_rows,
    loss_groups,
    per_user_losses,
    per_user_metrics,
    run_user_losses,
    run_user_metrics,
)
from jaxrec.experiment.run import main, recorded_seconds
from jaxrec.experiment.stats import summarise, user_tests
from jaxrec.experiment.tables import markdown, mean_std, write_csv, write_results
from jaxrec.stages import PER_RUN, SHARED

__all__ = [
    "METRICS",
    "PER_RUN",
    "SHARED",
    "Cell",
    "ExperimentArgs",
    "ExperimentConfig",
    "archive_run",
    "bar_plot",
    "baseline_of",
    "cell_row",
    "check_sweep",
    "chosen_points",
    "experiment_cells",
    "group_rows",
    "loss_groups",
    "main",
    "markdown",
    "mean_std",
    "per_user_losses",
    "per_user_metrics",
    "place_run",
    "read_experiment",
    "recorded_seconds",
    "run_folder",
    "run_user_losses",
    "run_user_metrics",
    "selected_cells",
    "shared_reads",
    "spare_folder",
    "summarise",
    "user_tests",
    "wire_cell",
    "write_csv",
    "write_results",
]
