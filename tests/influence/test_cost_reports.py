"""The cost reports of the attribution API (issue 27: "every estimator reports its time and peak
memory"): each measured block's own sampled peak, not the process's high-water mark."""

import sys
import time

import numpy as np
import pytest

from jaxrec.influence.pairwise import measured
from jaxrec.lds.report import _cost_cells
from jaxrec.lds.study import _costs

MiB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS sampling reads procfs")
def test_each_block_reports_its_own_peak_and_what_it_added():
    info_big: dict = {}
    with measured(info_big, "fit"):
        a = np.ones(256 * MiB // 8)  # 256 MiB, every page touched
        time.sleep(0.1)
        del a
    info_small: dict = {}
    with measured(info_small, "fit"):
        time.sleep(0.1)
    big, small = info_big["memory"]["fit"], info_small["memory"]["fit"]
    added_big = big["host_block_peak_rss_bytes"] - big["host_start_rss_bytes"]
    added_small = small["host_block_peak_rss_bytes"] - small["host_start_rss_bytes"]
    assert 250 * MiB <= added_big < 400 * MiB
    assert added_small < 32 * MiB
    # the second block's own peak is far below the first's; the process high-water mark is not
    assert small["host_block_peak_rss_bytes"] < big["host_block_peak_rss_bytes"] - 200 * MiB
    # (within 1 MiB: the kernel updates the two counters at different times)
    assert small["host_peak_rss_bytes"] >= big["host_block_peak_rss_bytes"] - MiB
    costs = _costs({"big": info_big, "small": info_small})
    assert costs["big"]["host_added_rss_bytes"] == added_big
    assert costs["small"]["host_block_peak_rss_bytes"] == small["host_block_peak_rss_bytes"]
    cells = _cost_cells(costs["big"]).split("|")
    assert float(cells[2]) == pytest.approx(added_big / 2**30, abs=0.006)


def test_cost_cells_of_a_cached_run_without_block_peaks():
    # attributions cached before block peaks were recorded: the high-water mark, marked <=
    cost = {"seconds": {"total": 12.345}, "host_peak_rss_bytes": 3 * 2**30}
    assert _cost_cells(cost) == " 12.3 | <= 3.00 | - |"
    assert _cost_cells({}) == " - | - | - |"
