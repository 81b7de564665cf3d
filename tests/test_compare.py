"""`simrec compare`: runs and sweep points side by side, differences from the first with
their intervals, compare.csv + report.html + plots, byte-identical on a repeat, one-line
errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import simrec
from simrec.cli import app
from simrec.compare import Estimate, compare, difference
from simrec.stats import interval

MMC = "scenarios/mmc.yaml"
SMALL = ["run.requests=1500", "run.replications=3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    a = simrec.simulate(simrec.load_scenario(MMC, [*SMALL, "workload.rate_qps=200"])).write(root / "a")
    b = simrec.simulate(simrec.load_scenario(MMC, [*SMALL, "workload.rate_qps=260"])).write(root / "b")
    s = simrec.sweep({"grid": {"workload.rate_qps": [150, 250]}, "set": {"run.requests": 1500, "run.replications": 3}},
                     base=simrec.load_scenario(MMC), executor="serial", out=root / "s")
    assert len(s.points) == 2
    return root, a, b, root / "s"


def test_compare_runs_and_sweep_points(folders):
    root, a, b, s = folders
    entries, table, text = compare([a, b, s], root / "out")
    assert [e.kind for e in entries] == ["run", "run", "sweep", "sweep"]
    assert entries[2].label.startswith("s#0") and "rate_qps=150" in entries[2].label
    p99 = table[table["metric"] == "e2e.p99_ms"].set_index("entry")
    assert p99.loc[0, "diff"] == 0
    # run vs run, equal replication counts: the difference of the two estimates (pooled P99s),
    # with the half-width of the paired interval of the per-replication differences
    ma, mb = (simrec.load_results(f).metric("e2e.p99_ms") for f in (a, b))
    paired = interval(np.subtract(mb["replications"], ma["replications"]))
    half = (paired["hi"] - paired["lo"]) / 2
    assert p99.loc[1, "diff_method"] == "paired"
    assert p99.loc[1, "diff"] == pytest.approx(mb["mean"] - ma["mean"])
    assert (p99.loc[1, "diff_lo"], p99.loc[1, "diff_hi"]) == pytest.approx(
        (mb["mean"] - ma["mean"] - half, mb["mean"] - ma["mean"] + half))
    assert p99.loc[2, "diff_method"] == "welch"          # a sweep point keeps no replications
    assert p99.loc[1, "diff"] > 0                        # more load, longer tail
    out = root / "out"
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["differences.png", "key_metrics.png",
                                                                 "latency_cdfs.png"]
    html = (out / "report.html").read_text()
    assert "Differences from a" in html and "s#1 (rate_qps=250)" in html
    csv = pd.read_csv(out / "compare.csv")
    assert set(csv["label"]) == {e.label for e in entries}
    assert "e2e.p99_ms" in text and "Δ e2e.p99_ms" in text


def test_compare_is_byte_identical_on_a_repeat(folders):
    root, a, b, s = folders
    compare([a, b, s], root / "one")
    compare([a, b, s], root / "two")
    names = ["compare.csv", "report.html", "plots/latency_cdfs.png", "plots/key_metrics.png",
             "plots/differences.png"]
    for n in names:
        assert (root / "one" / n).read_bytes() == (root / "two" / n).read_bytes(), n


def test_welch_difference_from_intervals():
    """Two t-intervals give back their standard errors; Welch-Satterthwaite combines them."""
    from scipy import stats
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 7.0]
    ix, iy = interval(x), interval(y)
    a = Estimate(ix["mean"], ix["lo"], ix["hi"], 4)
    b = Estimate(iy["mean"], iy["lo"], iy["hi"], 3)
    d, lo, hi, how = difference(a, b)
    vx, vy = np.var(x, ddof=1) / 4, np.var(y, ddof=1) / 3
    df = (vx + vy) ** 2 / (vx ** 2 / 3 + vy ** 2 / 2)
    half = stats.t.ppf(0.975, df) * math.sqrt(vx + vy)
    assert how == "welch" and d == pytest.approx(np.mean(y) - np.mean(x))
    assert (lo, hi) == pytest.approx((d - half, d + half))
    assert difference(a, Estimate(None, None, None, 3))[3] == "unbounded"


def test_cli_compare_and_its_errors(folders, tmp_path):
    root, a, b, _ = folders
    r = CliRunner().invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "results:" in r.output and (tmp_path / "c" / "compare.csv").is_file()
    for args, msg in ([[str(a), str(tmp_path / "missing")], "no such results folder"],
                      [[str(a)], "nothing to compare"],
                      [[str(a), str(b), "--out", str(a)], "is (or holds) the folder being compared"]):
        r = CliRunner().invoke(app, ["compare", *args])
        assert r.exit_code == 1 and msg in r.output, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert (a / "summary.json").is_file()               # the refused --out was left alone
