"""The serving testbed on CPU, simulated back: the serving-log format and the queueing logic.

A tiny GR model serves a few hundred requests per run (full policy; relay with a cache that
never fills; relay with a cache of three prefixes, which evicts and rejects). Replaying the
measured per-job busy time (service + host overhead) through the scenario simrec derives from
the serving log must give every request's measured latency back, to float rounding: the FIFO
order, the relay's cache decisions and the derivation leave nothing else to differ.
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
from simrec.serving_log import load_log                  # noqa: E402
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


def test_testbed_writes_serving_logs_that_simrec_derives_a_scenario_from(runs, tmp_path):
    for key, folder in runs.items():
        log = load_log(folder)
        rank = log.ranking()                        # raises unless exactly one per request
        assert len(rank) == REQUESTS
        assert ((rank["end_ms"] - rank["arrival_ms"]) > 0).all()
        ran = log.ran()
        assert (ran["service_ms"] > 0).all() and (ran["overhead_ms"] >= -1e-9).all()
        # one worker: jobs never overlap, and each starts after it arrived
        assert (ran["start_ms"].to_numpy()[1:] >= ran["end_ms"].to_numpy()[:-1]).all()
        assert (ran["start_ms"] >= ran["arrival_ms"]).all()
        trace = fid.requests_of(log)
        trace.to_parquet(tmp_path / f"{key}.parquet")
        scen = fid.scenario_for(log, str(tmp_path / f"{key}.parquet"))
        assert load_table(scen.stages["ranking"].service.table).manifest.name == "cpu_test"
        assert (scen.relay is None) == (key == "full")
        if scen.relay is not None:
            assert list(scen.stages) == [fid.UPSTREAM, "ranking"]
            assert scen.stages[fid.UPSTREAM].service.ms == 3.0
            np.testing.assert_allclose(rank["arrival_ms"], trace["arrival_ms"] + 3.0, atol=1e-9)
            assert scen.relay.signal_after == "arrival" and scen.relay.signal_ms == 0
            assert scen.relay.trigger.min_history_len == THRESHOLD
            assert scen.relay.cache.hbm_bytes == log.policy["cache_bytes"]
            assert scen.relay.cache.pin == "until_ranked"
        assert len(prepare(scen, 0).requests) == REQUESTS


def test_relay_runs_exercise_the_cache(runs):
    big, small = load_log(runs["relay"]), load_log(runs["relay_small"])
    for log in (big, small):
        rank = log.ranking()
        long = rank["history_len"] >= THRESHOLD
        assert (rank.loc[~long, "outcome"] == "miss").all()      # short users are never cached
        assert (rank.loc[long, "outcome"] == "hit").mean() > 0.3
        assert (log.jobs["outcome"] == "skipped").any()          # revisits reuse a prefix
    assert big.extra["meta"]["cache"]["evictions"] == 0 and big.extra["meta"]["cache"]["rejected"] == 0
    assert small.extra["meta"]["cache"]["evictions"] > 0


@pytest.mark.parametrize("key", ["full", "relay", "relay_small"])
def test_replay_of_logged_busy_time_reproduces_every_latency(runs, key, tmp_path):
    log = load_log(runs[key])
    trace = tmp_path / "t.parquet"
    fid.requests_of(log).to_parquet(trace)
    out = fid.simulate_task(fid.Task(str(runs[key]), str(trace), "replay", 1))
    rank = log.ranking()
    warm = fid.requests_of(log)["arrival_ms"].to_numpy() >= log.warmup_s * 1000
    measured = (rank["end_ms"] - rank["arrival_ms"]).to_numpy()[warm]
    np.testing.assert_allclose(out.latency0, measured, rtol=0, atol=1e-6)
    assert out.checks.get("unmatched_jobs") == 0
    assert out.checks.get("outcome_mismatch", 0) == 0       # the same cache decisions for every request


def test_fidelity_judges_each_source_and_cross_fits_every_pair(runs, pilot, tmp_path):
    report = fid.run_fidelity(list(runs.values()) + [pilot], tmp_path / "fid", cross=True, replications=3,
                              n_boot=100, jobs=2)
    rows = report.rows
    names = {load_log(p).name for p in runs.values()}
    assert set(rows["run"]) == names                          # the pilot is never judged
    assert list(report.table().columns) == list(fid.COLUMNS)
    prof = rows[rows["source"] == "profile"]
    assert len(prof) == len(names) ** 2 and set(prof["fit_run"]) == names
    assert (prof["in_sample"] == (prof["fit_run"] == prof["run"])).all()
    other = rows[rows["source"] != "profile"]
    assert set(other["source"]) == {"replay", "table"} and (other["fit_run"] == "").all()
    replay = rows[rows["source"] == "replay"]
    assert np.allclose(replay["sim_p99"], replay["meas_p99"], rtol=1e-9)
    assert (rows["meas_p99_lo"] <= rows["meas_p99"]).all() and (rows["meas_p99"] <= rows["meas_p99_hi"]).all()
    judged = rows[rows["source"] != "replay"]
    assert (judged["sim_p99_lo"] < judged["sim_p99"]).all() and (judged["sim_p99"] < judged["sim_p99_hi"]).all()
    out = tmp_path / "fid"
    assert sorted(p.name for p in out.iterdir()) == ["fidelity.csv", "fidelity.json", "fidelity.md",
                                                      "fidelity.png", "fidelity_detail.csv", "profiles"]
    assert len(list((out / "profiles").iterdir())) == len(names)
    assert pd.read_csv(out / "fidelity.csv").columns.tolist() == list(fid.COLUMNS)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temp folder left
    serial = fid.run_fidelity(list(runs.values()), None, cross=True, replications=3, n_boot=100, jobs=1)
    pd.testing.assert_frame_equal(serial.rows, rows)


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
    app.command()(cli_fidelity.fit)
    cli = CliRunner()
    res = cli.invoke(app, ["fidelity", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    res = cli.invoke(app, ["fit", str(tmp_path / "nothing"), "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "p.json").exists()
    res = cli.invoke(app, ["testbed", str(tmp_path / "nothing"), "--device", "cpu"])
    assert res.exit_code == 1 and "manifest.json missing" in res.output
    res = cli.invoke(app, ["fit", str(runs["relay"]), "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert "serving profile of relay_u70" in res.output and (tmp_path / "p.json").is_file()
    res = cli.invoke(app, ["fit", str(runs["full"]), "--out", str(tmp_path / "p.json")])   # a profile: replaced
    assert res.exit_code == 0, res.output
    mine = tmp_path / "notes.json"
    mine.write_text("{}")
    res = cli.invoke(app, ["fit", str(runs["full"]), "--out", str(mine)])                  # the user's: kept
    assert res.exit_code == 1 and "not a serving profile: not replaced" in res.output
    assert mine.read_text() == "{}"
    res = cli.invoke(app, ["fidelity", str(runs["full"]), "--sources", "replay,table", "--replications", "2",
                           "--bootstrap", "100", "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    assert "full_u70" in res.output and (tmp_path / "f" / "fidelity.png").exists()
