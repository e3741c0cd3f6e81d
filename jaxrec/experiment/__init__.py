"""``dealrec experiment CONFIG``: selection methods x seeds (x a grid of swept options) through
fine-tune and evaluation, with a results table, significance tests and a plot.

The config file is a pipeline config (:mod:`jaxrec.pipeline`) plus an ``experiment:`` section
(:class:`ExperimentConfig`). The shared stages (surrogate, influence, semantic IDs, effort) run
once; then every *cell* (method, seed, grid point) runs select -> finetune -> evaluate in
``workdir/runs/CELL/`` (:func:`run_folder`: a grid point at the config's own value is the
un-swept run, so every study of one workdir shares it). A finished cell is reused, so an
interrupted experiment continues where it stopped, and ``--methods`` / ``--seeds`` run a part
of it now and the rest later; the tables always cover every finished cell of the config. With
``experiment.archive`` a finished cell also lives outside the workdir (:mod:`jaxrec.archive`,
small enough to commit), and a cell archived there is not rerun after its workdir is gone. The
evaluation users are the same for every run (``evaluate.seed`` is not varied), so runs are
paired.

Two tests against the baseline method (``experiment.baseline``, ``random`` by default; the
paper's Fig. 4 compares its ablations with ``dealrec``), at the same grid point:

* over seeds: a paired t-test of the run means (pairs = seeds; needs >= 2 seeds);
* over users: every user's metric averaged over the seeds both methods ran, then a paired
  t-test and a Wilcoxon signed-rank test over the evaluated users (pairs = users).

Outputs in ``workdir``: ``results.md``, ``results.csv`` (one row per method and grid point:
mean and std over seeds, seconds per stage), ``runs.csv`` (one row per run), ``ttest.csv``
(over seeds), ``usertest.csv`` (over users) and ``results.png``.
"""

from jaxrec.experiment.grid import (
    INPUT_STAGES,
    METRICS,
    PER_RUN,
    SHARED,
    Cell,
    ExperimentArgs,
    ExperimentConfig,
    baseline_of,
    check_sweep,
    chosen_points,
    experiment_cells,
    read_experiment,
    run_folder,
    selected_cells,
    shared_reads,
    wire_cell,
)
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

__all__ = [
    "INPUT_STAGES",
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
    "read_experiment",
    "recorded_seconds",
    "run_folder",
    "run_user_losses",
    "run_user_metrics",
    "selected_cells",
    "shared_reads",
    "summarise",
    "user_tests",
    "wire_cell",
    "write_csv",
    "write_results",
]
