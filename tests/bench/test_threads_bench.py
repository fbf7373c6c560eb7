"""The thread-policy bench's bookkeeping (no timings asserted): every option timed quiet and loaded
in its own process, ratios to the best, the load process gone, and a verdict that follows the numbers.

Oracles: the ratios recomputed from the returned medians; the OS's process table (``kill(pid, 0)``);
a result built by hand whose verdict is known.
"""

import os

import pytest

from pipeline.bench.threads import (
    CONDITIONS,
    WITHIN,
    format_threads,
    options,
    thread_policy_table,
    within_both,
)


def cell(median, spread=0.01, threads=1):
    return {
        "seconds": [median],
        "min": median - spread,
        "median": median,
        "max": median + spread,
        "threads": [threads],
    }


def with_ratios(medians):
    cells = {name: {c: cell(m) for c, m in zip(CONDITIONS, ms, strict=True)} for name, ms in medians.items()}
    for c in CONDITIONS:
        best = min(by[c]["median"] for by in cells.values())
        for by in cells.values():
            by[c]["ratio"] = by[c]["median"] / best
    return cells


def result_of(cells):
    return {
        "cells": cells,
        "within_10pct_both": within_both(cells),
        "workload": {"name": "cifar2-shaped", "n_train": 8000, "n_val": 2000, "batch": 256, "epochs": 2},
        "repeats": 3,
        "cores": 2,
        "load": "one busy loop",
        "load_average_1min": {"start": 1.0, "min": 1.0, "max": 2.0},
    }


@pytest.fixture(scope="module")
def tiny_run():
    lines = []
    result = thread_policy_table(quick=True, repeats=1, n_train=256, epochs=1, log=lines.append)
    return result, lines


@pytest.mark.slow
def test_every_option_is_timed_quiet_and_loaded(tiny_run):
    result, lines = tiny_run
    names = [o.name for o in options()]
    assert list(result["cells"]) == names == [o["name"] for o in result["options"]]
    assert len(lines) == len(names) * len(CONDITIONS)
    for by in result["cells"].values():
        assert set(by) == set(CONDITIONS)
        for c in CONDITIONS:
            assert len(by[c]["seconds"]) == 1 and by[c]["seconds"][0] > 0
            assert by[c]["min"] <= by[c]["median"] <= by[c]["max"]
    assert result["cells"]["threads=1"]["quiet"]["threads"] == [1]
    by_setting = {o["setting"]: o for o in result["options"]}
    assert by_setting["cores"]["env"] == {"OMP_WAIT_POLICY": "PASSIVE"} and by_setting["free"]["env"] == {}
    assert result["cells"][by_setting["cores"]["name"]]["loaded"]["threads"] == [result["cores"]]


@pytest.mark.slow
def test_ratios_are_to_the_best_median_with_one_best_per_condition(tiny_run):
    result, _ = tiny_run
    cells = result["cells"]
    for c in CONDITIONS:
        best = min(by[c]["median"] for by in cells.values())
        ratios = {name: by[c]["ratio"] for name, by in cells.items()}
        assert ratios == pytest.approx({name: by[c]["median"] / best for name, by in cells.items()})
        assert all(r >= 1.0 for r in ratios.values())
        assert [name for name, r in ratios.items() if r == 1.0] == [result["best"][c]]


@pytest.mark.slow
def test_the_competing_process_is_gone(tiny_run):
    result, _ = tiny_run
    assert len(result["load_pids"]) == len(result["cells"])  # one per loaded measurement
    for pid in result["load_pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_the_verdict_of_a_real_run_follows_its_numbers(tiny_run):
    result, _ = tiny_run
    lines = format_threads(result)
    assert lines[0] == "## Thread policy"
    assert sum(line.startswith("| threads=") for line in lines) == len(result["cells"])
    worst = {name: max(by[c]["ratio"] for c in CONDITIONS) for name, by in result["cells"].items()}
    good = [name for name, w in worst.items() if w <= WITHIN]
    sentence = lines[-1]
    assert sorted(result["within_10pct_both"]) == sorted(good)
    if good:
        assert sentence.startswith("Within 10 %") and sentence.count("(quiet ×") == len(good)
        assert all(f"{name} (quiet ×" in sentence for name in good)
    else:
        assert sentence.startswith("No option") and f"{min(worst, key=worst.get)} (quiet ×" in sentence


def test_the_verdict_names_the_option_good_in_both_conditions():
    cells = with_ratios(
        {"threads=1": (0.90, 0.87), "threads=cores (2)": (0.45, 2.56), "threads=free": (0.47, 0.90)}
    )
    sentence = format_threads(result_of(cells))[-1]
    assert (
        sentence == "Within 10 % of the best both quiet and loaded: threads=free (quiet ×1.04, loaded ×1.03)."
    )


def test_without_such_an_option_the_verdict_names_the_smallest_worst_case():
    cells = with_ratios({"threads=1": (0.90, 0.87), "threads=cores (2)": (0.45, 2.56)})
    lines = format_threads(result_of(cells))
    assert lines[-1] == (
        "No option is within 10 % of the best in both conditions; "
        "the smallest worst case is threads=1 (quiet ×2.00, loaded ×1.00)."
    )
    assert "| threads=cores (2) | 1 / 1 | 0.450 [0.440–0.460] ×1.00 | 2.560 [2.550–2.570] ×2.94 |" in lines
