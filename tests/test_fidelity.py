"""The serving testbed on CPU, simulated back: the trace format and the queueing logic.

A tiny GR model serves a few hundred requests per run (full policy; relay with a cache that
never fills; relay with a cache of three prefixes, which evicts and rejects). Replaying the
measured per-job worker time (service + host overhead) through the simulator must give
every request's measured latency back, to float rounding: the FIFO order, the relay's cache
decisions and the scenario the testbed writes leave nothing else to differ. Replaying the
kernel time alone (service_ms) must land below the measurement by no more than the host
overhead accumulated over the job's busy period (see `overhead_bound`).
"""

from __future__ import annotations

import datetime
import math

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from simrec import fidelity as fid                       # noqa: E402
from simrec.calibration import testbed as tb             # noqa: E402
from simrec.calibration.gr_models import GRSpec          # noqa: E402
from simrec.calibration.table import load_table, write_table   # noqa: E402
from simrec.cascade import prepare                       # noqa: E402
from simrec import cli_fidelity                          # noqa: E402

SPEC = GRSpec(arch="transformer", layers=1, d_model=32, heads=2, ffn=64, dtype="float32",
              short_term_tokens=4)
LENS, M = (16, 32, 64), 8
THRESHOLD = 32
REQUESTS = 300


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A made-up table for SPEC (the replay does not use its times; the others do)."""
    rows = []
    mult = {0.1: 0.9, 0.5: 1.0, 0.9: 1.3, 0.99: 2.0}
    for L in LENS:
        for phase, M_, ms in (("full_forward", M, 0.3 + 0.002 * L), ("rank_cached", M, 0.25),
                              ("prefix_encode", 0, 0.2 + 0.002 * L), ("prefix_reload", 0, 0.01)):
            for q, k in mult.items():
                rows.append((phase, "isolated", L, M_, q, ms * k, 100))
    frame = pd.DataFrame(rows, columns=["phase", "condition", "history_len", "candidates", "quantile",
                                        "time_ms", "n_samples"])
    folder = tmp_path_factory.mktemp("tables") / "cpu_test"
    write_table(frame, folder, {
        "format_version": 1, "name": "cpu_test", "label": "illustrative", "table_file": "table.parquet",
        "sha256": "0" * 64, "device": {"name": "cpu", "kind": "cpu"},
        "date": datetime.date.today().isoformat(), "model": SPEC.to_dict(),
        "grid": {"history_len": list(LENS), "candidates": [M]}, "method": {"seed": 0}})
    return folder


@pytest.fixture(scope="module")
def runs(table, tmp_path_factory):
    """Three real runs on the CPU: full, relay (no eviction), relay (3-prefix cache)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs")
    base = tb.Workload(rate_qps=1.0, requests=1, users=60, zipf_s=1.0, history_lens=LENS,
                       length_weights=(0.4, 0.3, 0.3), candidates=M, lead_ms=3.0, seed=5)
    small = 3 * max(LENS) * SPEC.kv_bytes_per_token
    folders = {}
    for key, policy, tag in (("full", tb.Policy("full"), ""),
                             ("relay", tb.Policy("relay", THRESHOLD, 2**30), ""),
                             ("relay_small", tb.Policy("relay", THRESHOLD, small), "_small")):
        path, = tb.run_series(table, out, policy, [0.7], [REQUESTS], base, "cpu", pilot_s=0.3,
                              tags=[tag], keep_pilot=key == "relay", log=lambda s: None)
        folders[key] = path
    return folders


@pytest.fixture(scope="module")
def pilot(runs):
    """The relay series' kept pilot (same table as every run here: one 'machine')."""
    return runs["relay"].parent / "pilot_relay_u70"


def overhead_bound(run: fid.Run) -> pd.Series:
    """Per request: how far a replay without host overhead may fall below the measurement.

    Measured, job k ends at e_k = max(a_k, e_{k-1}) + o_k + s_k; replayed without overhead,
    e'_k = max(a_k, e'_{k-1}) + s_k. So 0 <= e_k - e'_k <= o_k + (e_{k-1} - e'_{k-1} if job k
    queued behind job k-1, else 0); a cancelled pre-infer job costs the simulator nothing,
    so its whole time counts as overhead.
    """
    j = run.ran()
    add = j["overhead_ms"] + np.where(j["outcome"] == "cancelled", j["service_ms"], 0.0)
    queued = j["arrival_ms"].to_numpy() < j["end_ms"].shift(1).fillna(-np.inf).to_numpy()
    bound, acc = np.empty(len(j)), 0.0
    for k, (o, q) in enumerate(zip(add.to_numpy(), queued)):
        acc = o + (acc if q else 0.0)
        bound[k] = acc
    rank = j["kind"] == "rank"
    return pd.Series(bound[rank.to_numpy()], index=j.loc[rank, "request_id"].to_numpy()).sort_index()


def test_run_folders_hold_a_valid_scenario_and_one_ranking_job_per_request(runs):
    for key, folder in runs.items():
        run = fid.load_run(folder)
        assert len(run.trace) == REQUESTS
        rank = run.ranking()                        # raises unless exactly one per request
        assert (rank["latency_ms"] > 0).all()
        np.testing.assert_allclose(rank["arrival_ms"], run.trace["arrival_ms"] + 3.0, atol=1e-9)
        ran = run.ran()
        assert (ran["service_ms"] > 0).all() and (ran["overhead_ms"] >= -1e-9).all()
        # one worker: jobs never overlap, and each starts after it arrived
        assert (ran["start_ms"].to_numpy()[1:] >= ran["end_ms"].to_numpy()[:-1]).all()
        assert (ran["start_ms"] >= ran["arrival_ms"]).all()
        scen = run.scenario
        assert list(scen.stages) == [tb.UPSTREAM, "ranking"]
        assert scen.stages[tb.UPSTREAM].router == "delay"
        assert scen.stages[tb.UPSTREAM].service.ms == 3.0
        assert load_table(scen.stages["ranking"].service.table).manifest.name == "cpu_test"
        assert (scen.relay is None) == (key == "full")
        if scen.relay is not None:
            assert scen.relay.signal_after == "arrival" and scen.relay.signal_ms == 0
            assert scen.relay.trigger.min_history_len == THRESHOLD
            assert scen.relay.cache.hbm_bytes == run.meta["policy"]["cache_bytes"]
        assert len(prepare(scen, 0).requests) == REQUESTS


def test_stored_columns_rebuild_the_served_log_bit_for_bit(tmp_path):
    """jobs.parquet keeps only the measured columns; load_run must rebuild every other
    column exactly as the testbed computed it while serving (an evicting relay run: skipped
    and rejected rows without times sit between the executed ones)."""
    server = tb.Server(SPEC, torch.device("cpu"), LENS, M)
    w = tb.Workload(rate_qps=400.0, requests=150, users=40, zipf_s=1.0, history_lens=LENS,
                    length_weights=(0.4, 0.3, 0.3), candidates=M, lead_ms=3.0, seed=7)
    policy = tb.Policy("relay", THRESHOLD, 2 * max(LENS) * SPEC.kv_bytes_per_token)
    served = tb.serve(server, tb.schedule(w), policy, w.lead_ms)
    assert {"skipped", "computed"} <= set(served.jobs["outcome"].astype(str))
    assert served.info["cache"]["evictions"] > 0
    tb.write_jobs(served.jobs, tmp_path / "jobs.parquet")
    stored = pd.read_parquet(tmp_path / "jobs.parquet")
    assert list(stored.columns) == list(tb.STORED_COLUMNS)
    rebuilt = fid.with_derived_columns(stored, served.trace, w.lead_ms)
    pd.testing.assert_frame_equal(rebuilt[list(served.jobs.columns)], served.jobs, check_exact=True)


def test_relay_runs_exercise_the_cache(runs):
    big, small = fid.load_run(runs["relay"]), fid.load_run(runs["relay_small"])
    for run in (big, small):
        rank = run.ranking()
        long = rank["history_len"] >= THRESHOLD
        assert (rank.loc[~long, "outcome"] == "miss").all()      # short users are never cached
        assert (rank.loc[long, "outcome"] == "hit").mean() > 0.3
        assert (run.jobs["outcome"] == "skipped").any()          # revisits reuse a prefix
    assert big.meta["cache"]["evictions"] == 0 and big.meta["cache"]["rejected"] == 0
    assert small.meta["cache"]["evictions"] > 0


@pytest.mark.parametrize("key", ["full", "relay", "relay_small"])
def test_replay_of_measured_worker_time_reproduces_every_latency(runs, key):
    run = fid.load_run(runs[key])
    out = fid.simulate_source(run, "replay")
    measured = run.ranking()["latency_ms"].to_numpy()
    np.testing.assert_allclose(out.latency[0], measured, rtol=0, atol=1e-6)
    assert out.checks == {"phase_mismatch": 0, "unmatched_jobs": 0}
    if out.prefix is not None:       # the same cache decisions for every request
        assert (out.prefix[0] == run.ranking()["outcome"].to_numpy()).all()
        assert (out.reused[0] == fid.reused(run)).all()


@pytest.mark.parametrize("key", ["full", "relay"])
def test_replay_of_kernel_time_alone_misses_only_the_host_overhead(runs, key):
    run = fid.load_run(runs[key])
    out = fid.simulate_source(run, "replay_kernel")
    gap = run.ranking()["latency_ms"].to_numpy() - out.latency[0]
    bound = overhead_bound(run).to_numpy()
    assert (gap >= -1e-6).all()
    assert (gap <= bound + 1e-6).all(), float(np.max(gap - bound))
    if out.prefix is not None:       # without evictions the decisions do not depend on timing
        assert (out.prefix[0] == run.ranking()["outcome"].to_numpy()).all()


def test_compare_fits_on_one_run_and_writes_the_report(runs, pilot, tmp_path):
    loaded = [fid.load_run(p) for p in runs.values()]
    report = fid.compare(loaded + [fid.load_run(pilot)], replications=2, n_boot=100)
    rows = report.rows
    assert set(rows["source"]) == set(fid.SOURCES)
    assert set(rows["run"]) == {r.name for r in loaded}
    fit = report.corrections["additive_iid"]["fit_run"]
    assert fit == runs["relay"].name                   # the relay run with the larger cache
    assert set(rows.loc[rows["in_sample"], "run"]) == {fit}
    replay = rows[(rows["source"] == "replay") & rows["metric"].isin(fid.METRICS)]
    assert np.allclose(replay["error"], 0, atol=1e-9)
    p99 = rows[rows["metric"] == "p99"]
    assert (p99["measured_lo"] <= p99["measured"]).all() and (p99["measured"] <= p99["measured_hi"]).all()
    paths = report.write(tmp_path / "fid")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert report.markdown().count("\n| ") == len(loaded)


def test_pilot_is_fit_data_for_its_own_machine_only(runs, pilot):
    loaded = [fid.load_run(p) for p in runs.values()]
    kept = fid.load_run(pilot)
    assert kept.is_pilot and kept.policy == "relay" and kept.table_key == loaded[0].table_key
    report = fid.compare(loaded + [kept], replications=2, sources=("replay", "additive_pilot"), n_boot=100)
    rows = report.rows
    assert set(rows["run"]) == {r.name for r in loaded}          # the pilot is never judged
    assert set(rows.loc[rows["source"] == "additive_pilot", "run"]) == {r.name for r in loaded}
    assert not rows["in_sample"].any()
    assert list(report.corrections["additive_pilot"]) == [kept.name]
    fit = fid.fit_correction(kept, **fid.CORRECTIONS["additive_pilot"])
    assert report.corrections["additive_pilot"][kept.name] == fit.summary()
    # without the pilot (another machine's runs), the per-machine source is left out
    alone = fid.compare(loaded, replications=2, sources=("replay", "additive_pilot"), n_boot=100)
    assert set(alone.rows["source"]) == {"replay"}
    with pytest.raises(fid.InputError):
        fid.compare([kept], replications=1, sources=("replay",))


def test_cross_fit_judges_every_fit_on_every_run_as_compare_would(runs, pilot, tmp_path):
    loaded = [fid.load_run(p) for p in runs.values()]
    cross = fid.cross_fit(loaded + [fid.load_run(pilot)], replications=2, jobs=2)
    names = {r.name for r in loaded}                         # the pilot takes no part
    assert set(cross["fit_run"]) == names and set(cross["run"]) == names
    assert len(cross) == len(names) ** 2 * len(fid.METRICS)
    assert (cross["in_sample"] == (cross["fit_run"] == cross["run"])).all()
    fit = loaded[2].name
    report = fid.compare(loaded, replications=2, fit_run=fit, sources=("additive_iid",), n_boot=100)
    a = report.rows[report.rows["metric"].isin(fid.METRICS)].set_index(["run", "metric"])["simulated"]
    b = cross[cross["fit_run"] == fit].set_index(["run", "metric"])["simulated"]
    pd.testing.assert_series_equal(a.sort_index(), b.sort_index(), check_names=False)
    report.cross = cross
    paths = report.write(tmp_path / "fid")
    assert (tmp_path / "fid" / "cross_fit.csv") in paths
    assert "## Cross-fit" in (tmp_path / "fid" / "fidelity.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temp folder left


def test_signal_host_cost_recovers_a_known_per_signal_charge():
    """Jobs whose overhead is 5 us + 40 us per admitted and 2 us per skipped signal that
    arrived since the previous job started: the fit gives those figures back."""
    rng = np.random.default_rng(3)
    n = 400
    start = np.cumsum(rng.uniform(0.5, 2.0, n))
    adm, skp = rng.integers(0, 3, n), rng.integers(0, 4, n)
    rows = []
    for k in range(n):
        lo = start[k - 1] if k else 0.0
        for kind_n, outcome in ((adm[k], "computed"), (skp[k], "skipped")):
            rows += [("pre", lo + (start[k] - lo) * (i + 1) / (kind_n + 1), outcome) for i in range(kind_n)]
    pre = pd.DataFrame(rows, columns=["kind", "arrival_ms", "outcome"]).assign(
        start_ms=np.nan, end_ms=np.nan, service_ms=np.nan, overhead_ms=np.nan)
    over = (5.0 + 40.0 * adm + 2.0 * skp) / 1000.0
    ranked = pd.DataFrame({"kind": "rank", "arrival_ms": start - over, "outcome": "hit", "start_ms": start,
                           "end_ms": start + 0.4, "service_ms": 0.4, "overhead_ms": over})
    run = fid.Run("synthetic", None, {"policy": {"kind": "relay"}}, pd.concat([ranked, pre]), None, None)
    cost = fid.signal_host_cost(run)
    assert cost == pytest.approx({"base": 5.0, "admitted": 40.0, "skipped": 2.0}, abs=1e-6)


def test_block_bootstrap_interval_has_the_right_width_on_iid_data():
    x = np.random.default_rng(3).normal(size=4000)
    block = fid.block_length(x)
    assert block == math.ceil(math.sqrt(len(x)))       # no autocorrelation: the floor
    ci = fid.block_bootstrap(x, block, n_boot=400)
    lo, hi = ci["mean"]
    assert lo < 0 < hi
    assert 0.6 < (hi - lo) / (2 * 1.96 / math.sqrt(len(x))) < 1.5


def test_cli_commands_report_bad_input_in_one_line(runs, tmp_path):
    app = typer.Typer()
    app.command()(cli_fidelity.testbed)
    app.command()(cli_fidelity.fidelity)
    cli = CliRunner()
    res = cli.invoke(app, ["fidelity", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and "no jobs.parquet" in res.output and "Traceback" not in res.output
    res = cli.invoke(app, ["testbed", str(tmp_path / "nothing"), "--device", "cpu"])
    assert res.exit_code == 1 and "manifest.json missing" in res.output
    res = cli.invoke(app, ["fidelity", str(runs["full"]), "--sources", "replay,table", "--replications", "2",
                           "--bootstrap", "100", "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    assert "full_u70" in res.output and (tmp_path / "f" / "fidelity.png").exists()
    res = cli.invoke(app, ["fidelity", str(runs["full"]), str(runs["relay"]), "--sources", "replay",
                           "--replications", "1", "--bootstrap", "100", "--cross-fit", "--jobs", "1",
                           "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "Out of sample: median |error|" in res.output and (tmp_path / "c" / "cross_fit.csv").exists()


def test_parallel_compare_gives_the_same_report_as_serial(runs):
    loaded = [fid.load_run(p) for p in runs.values()]
    kw = dict(replications=1, sources=("replay", "table", "additive_iid"), n_boot=100)
    serial = fid.compare(loaded, jobs=1, **kw)
    parallel = fid.compare(loaded, jobs=2, **kw)
    pd.testing.assert_frame_equal(serial.rows, parallel.rows)
    assert serial.corrections == parallel.corrections


def _correction(**kw) -> fid.Correction:
    starts = {"*": np.arange(4.0), "p": np.arange(4.0)}
    eps = {"*": np.array([1.0, 2.0, 3.0, 4.0]), "p": np.array([1.0, 2.0, 3.0, 4.0])}
    pools = {"*": np.full(200, 9.0), "p": np.full(200, 7.0)}
    return fid.Correction("fit", None, pools, starts, eps, **kw)


def test_correction_draws_from_its_phases_pool_and_applies_it():
    c = _correction(additive=True)
    assert c.draw("p", 0.0, 0.0, 0.5) == 7.0
    assert c.draw("q", 0.0, 0.0, 0.5) == 9.0                     # unknown phase: all residuals
    assert c.time("p", 2.0, 0.25) == 2.25                        # additive
    assert _correction().time("p", 2.0, 0.25) == 0.5             # multiplicative


def test_idle_binned_correction_draws_from_the_bin_of_the_jobs_idle_time():
    assert [fid.idle_bin(x) for x in (0.0, 0.3, 0.5, 1.0, 2.0, 5.0, 50.0, math.inf)] == [0, 1, 1, 2, 2, 3, 4, 4]
    c = _correction(additive=True, idle=True)
    c.pools["p|0"], c.pools["p|3"] = np.full(60, 1.0), np.full(60, 5.0)
    assert c.draw("p", 0.0, 0.0, 0.5, idle_ms=0.0) == 1.0        # queued behind another job
    assert c.draw("p", 0.0, 0.0, 0.5, idle_ms=4.0) == 5.0        # after 2-10 ms idle
    assert c.draw("p", 0.0, 0.0, 0.5, idle_ms=1.0) == 7.0        # no pool for that bin: the phase's
    assert c.draw("q", 0.0, 0.0, 0.5, idle_ms=4.0) == 9.0
    assert _correction(additive=True).draw("p", 0.0, 0.0, 0.5, idle_ms=0.0) == 7.0   # idle off


def test_idle_binned_fit_splits_each_phase_pool_by_idle_bin(runs):
    run = fid.load_run(runs["relay"])
    c = fid.fit_correction(run, levels=False, additive=True, idle=True)
    plain = fid.fit_correction(run, levels=False, additive=True)
    assert {k: list(v) for k, v in plain.pools.items()} == {k: list(c.pools[k]) for k in plain.pools}
    binned = [k for k in c.pools if "|" in k]
    assert binned and all(len(c.pools[k]) >= fid.MIN_IDLE_POOL for k in binned)
    for k in binned:                          # each bin's residuals come from its phase's pool
        phase = k.split("|")[0]
        assert np.isin(c.pools[k], c.pools[phase]).all()


def test_temporal_correction_replays_the_fit_runs_residuals_in_time_order():
    c = _correction(temporal=True)
    assert c.span_ms == 3.0
    got = [c.draw("p", t, 0.0, 0.5) for t in (0.0, 0.5, 1.0, 2.5)]
    assert got == [1.0, 2.0, 2.0, 4.0]                           # the next job started at or after t
    assert c.draw("p", 0.5, 1.0, 0.5) == 3.0                     # shifted by the replication's offset


def test_additive_correction_fitted_on_a_run_carries_its_mean_excess(runs):
    run = fid.load_run(runs["relay"])
    c = fid.fit_correction(run, levels=False, additive=True)
    table = load_table(run.scenario.stages["ranking"].service.table)
    j = run.ran()
    cut = run.scenario.run.warmup_s * 1000.0
    j = j[(run.trace["arrival_ms"].to_numpy()[j["request_id"].to_numpy()] >= cut) & (j["phase"] != "")]
    for phase, g in j.groupby("phase"):
        iso = [table.curve(phase).median_ms(L, 0 if phase == "prefix_encode" else m)
               for L, m in zip(g["history_len"], g["candidates"])]
        assert math.isclose(c.pools[phase].mean(), float((g["busy_ms"] - iso).mean()), rel_tol=1e-9)


def test_sorted_quantile_is_numpys_linear_quantile():
    rng = np.random.default_rng(2)
    for n in (1, 2, 3, 500):
        a = np.sort(rng.standard_normal(n))
        for u in [0.0, 0.5, 1.0, *rng.uniform(size=200)]:
            assert fid.sorted_quantile(a, u) == float(np.quantile(a, u))
