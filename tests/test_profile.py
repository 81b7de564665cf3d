"""Serving profiles against known truth: synthetic serving logs with planted slow episodes.

A one-server FIFO log is generated from a cost table's medians plus an additive in-serving
excess, with every job that starts inside an episode running `factor` x slower. The fit
must find the episodes that were planted in that log (not only a rate on average), and a
scenario using the fitted profile must put the log's own P99 inside its prediction interval.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import simrec
from simrec import scenario as sc
from simrec.fidelity import run_fidelity
from simrec.stats import prediction_interval
from simrec.interference import Episodes
from simrec.serving_log import load_log, write_log

RATE_QPS = 320.0
LENS = (256, 1024, 4096)


def planted_episodes(rng, span_ms, rate_per_min, mean_s, factor):
    """Alternating normal spells (exponential) and episodes (lognormal, cv 0.3)."""
    out, t = [], 0.0
    sigma = math.sqrt(math.log1p(0.09))
    while True:
        t += rng.exponential(60_000.0 / rate_per_min)
        if t >= span_ms:
            return out
        d = rng.lognormal(math.log(mean_s * 1000) - sigma**2 / 2, sigma)
        out.append((t, t + d, factor))
        t += d


def synthetic_log(folder, table, seconds=60.0, episodes=(8.0, 2.0, 1.8), seed=0, level=1.0):
    """Write a serving log; returns the planted episodes [(start_ms, end_ms, factor)].
    `level`: the run's in-serving level, a factor on every job's time."""
    from simrec.calibration.table import load_table
    rng = np.random.default_rng(seed)
    curve = load_table(table).curve("full_forward")
    n = int(seconds * RATE_QPS)
    arrival = np.cumsum(rng.exponential(1000.0 / RATE_QPS, n))
    L = rng.choice(LENS, n)
    med = {l: curve.median_ms(l, 128) for l in LENS}
    excess = 0.1 + rng.exponential(0.2, n)
    planted = planted_episodes(rng, arrival[-1], *episodes) if episodes else []
    starts, ends = np.empty(n), np.empty(n)
    prev, k = 0.0, 0
    for i in range(n):
        s = max(arrival[i], prev)
        while k < len(planted) and planted[k][1] <= s:
            k += 1
        f = planted[k][2] if k < len(planted) and planted[k][0] <= s else 1.0
        prev = s + (med[L[i]] + excess[i]) * f * level
        starts[i], ends[i] = s, prev
    jobs = pd.DataFrame({"kind": "rank", "request_id": np.arange(n), "user_id": rng.integers(0, 1000, n),
                         "history_len": L, "candidates": 128, "arrival_ms": arrival, "start_ms": starts,
                         "end_ms": ends, "outcome": "none"})
    write_log(folder, jobs, {"device": "synthetic", "table": table, "policy": {"kind": "full"},
                             "lead_ms": 0.0, "warmup_s": 2.0})
    return planted


@pytest.fixture(scope="module")
def episodic(tmp_path_factory, gr_table):
    folder = tmp_path_factory.mktemp("logs") / "episodic"
    planted = synthetic_log(folder, gr_table)
    return folder, planted


def test_fit_recovers_the_planted_episodes(episodic):
    from simrec.fidelity import fit_log
    folder, planted = episodic
    profile, per_job = fit_log(load_log(folder))
    fit = profile.info["fit"]
    assert fit["accepted"], fit
    truth = [p for p in planted if p[0] >= 2000.0]        # after the warm-up the fit sees
    w = fit["window_s"] * 1000
    # every planted episode longer than two windows is found, and nothing else
    long = [p for p in truth if p[1] - p[0] > 2 * w]
    assert abs(fit["episodes"] - len(truth)) <= len(truth) - len(long) + 1, (fit["episodes"], len(truth))
    # the jobs labelled slow are the jobs planted slow, but for the windows at the edges
    s = per_job["start_ms"].to_numpy()
    inside = np.zeros(len(s), bool)
    for a, b, _ in truth:
        inside |= (s >= a) & (s < b)
    labelled = per_job["in_episode"].to_numpy()
    edge = len(truth) * 2 * w * RATE_QPS / 1000        # at most a window of jobs per episode edge
    assert (labelled != inside).sum() <= edge
    # slowdown: planted 1.8 for every episode
    assert fit["slowdown"]["median"] == pytest.approx(1.8, rel=0.05)
    # durations: each planted duration to within one window per edge
    planted_s = sorted((b - a) / 1000 for a, b, _ in long)
    found = sorted(profile.episodes.duration_s.values)[-len(planted_s):]
    assert np.allclose(found, planted_s, atol=2 * fit["window_s"])
    # the excess, with the episodes taken out: 0.1 + Exp(0.2) -> median 0.1 + 0.2 ln 2
    pool, elasticity = profile.pool("full_forward", 1.0, 0.0)
    assert np.interp(0.5, profile.quantiles, pool) == pytest.approx(0.1 + 0.2 * math.log(2), abs=0.02)
    # every job was planted factor x slower, whatever its size: elasticity 1 in every class
    assert elasticity == pytest.approx(1.0, abs=0.1)
    assert all(e == pytest.approx(1.0, abs=0.1) for e in profile.phases["full_forward"].elasticity.values())


def test_no_episodes_are_found_in_iid_noise(tmp_path, gr_table):
    from simrec.fidelity import fit_log
    synthetic_log(tmp_path / "iid", gr_table, episodes=None, seed=3)
    profile, per_job = fit_log(load_log(tmp_path / "iid"))
    assert profile.episodes is None
    assert not profile.info["fit"]["accepted"]
    assert not per_job["in_episode"].any()


def test_profile_scenario_reproduces_the_logs_p99(episodic, tmp_path):
    folder, _ = episodic
    report = run_fidelity([folder], tmp_path / "fid", replications=10, sources=("replay", "table", "profile"),
                          n_boot=300, jobs=1)
    rows = report.table().set_index("source")
    meas = rows.loc["profile", "meas_p99"]
    assert rows.loc["profile", "sim_p99_lo"] <= meas <= rows.loc["profile", "sim_p99_hi"]
    # the replay source reproduces the measured latencies: the derived scenario is the system
    assert rows.loc["replay", "sim_p99"] == pytest.approx(meas, rel=1e-9)
    # and the plain table, which knows neither excess nor episodes, is far below
    assert rows.loc["table", "sim_p99"] < 0.7 * meas
    assert list(report.table().columns) == ["run", "policy", "utilisation", "requests", "meas_p50", "meas_p99",
                                            "meas_p99_lo", "meas_p99_hi", "source", "fit_run", "sim_p50",
                                            "sim_p99", "sim_p99_lo", "sim_p99_hi", "in_sample"]
    assert (tmp_path / "fid" / "profiles" / "episodic.json").is_file()


def test_episode_timeline_matches_its_declared_rate_and_duration():
    """Over a long horizon the fraction of time in episodes is E[D] / (E[G] + E[D])."""
    cfg = sc.Interference(rate_per_min=6.0, duration_s={"kind": "constant", "value": 2.0},
                          slowdown={"kind": "constant", "value": 1.5})
    ep = Episodes(cfg, np.random.default_rng(1))
    t = np.arange(0, 3_600_000, 50.0)
    f = np.array([ep.factor_at(x) for x in t])
    frac = (f > 1).mean()
    # 1800 episodes: the count is Poisson-like; 4 sd of the fraction ~ 4 * 0.14 / sqrt(180) of it
    assert frac == pytest.approx(2.0 / (10.0 + 2.0), rel=0.05)
    assert set(np.unique(f)) == {1.0, 1.5}


def test_interference_block_slows_a_stage_by_its_time_share(gr_table):
    """M/D/1-like stage: mean service rises by (slowdown - 1) x time share of episodes."""
    base = {"name": "x", "workload": {"rate_qps": 100, "users": {"count": 1000},
                                      "candidates": {"kind": "constant", "value": 128}},
            "stages": {"s": {"nodes": {"count": 1, "device": "cpu"},
                             "service": {"kind": "constant", "ms": 2.0}}},
            "slo": {"p99_ms": 100.0}, "run": {"duration_s": 600, "replications": 1, "seed": 4, "warmup_s": 0}}
    plain = simrec.simulate(simrec.loader.validate(base, "<t>", None))
    base["stages"]["s"]["interference"] = {"rate_per_min": 6.0, "duration_s": {"kind": "constant", "value": 2.0},
                                           "slowdown": {"kind": "constant", "value": 1.5}}
    slow = simrec.simulate(simrec.loader.validate(base, "<t>", None))
    m0 = plain.requests.to_pandas()["s_service_ms"].mean()
    m1 = slow.requests.to_pandas()["s_service_ms"].mean()
    assert m0 == pytest.approx(2.0)
    share = 2.0 / 12.0
    # 600 s hold about 50 episodes: the share is known to about +-15% (1/sqrt(50)) x 3
    assert m1 / m0 - 1 == pytest.approx(0.5 * share, rel=0.45)


def test_prediction_interval_is_a_lognormal_t_interval():
    c, lo, hi = prediction_interval([10.0, 10.0 * math.e])
    assert c == pytest.approx(10.0 * math.exp(0.5))
    from scipy.stats import t
    h = t.ppf(0.975, 1) * (1 / math.sqrt(2)) * math.sqrt(1.5)
    assert lo == pytest.approx(10.0 * math.exp(0.5 - h))
    assert hi == pytest.approx(10.0 * math.exp(0.5 + h))


def test_run_prints_p99_prediction_intervals_when_asked(tmp_path):
    from typer.testing import CliRunner
    from simrec.cli import app
    scen = tmp_path / "s.yaml"
    scen.write_text("""name: pi
workload: {rate_qps: 100, users: {count: 100}, candidates: {kind: constant, value: 8}}
stages:
  s:
    nodes: {count: 1, device: cpu}
    service: {kind: exponential, mean_ms: 5}
    interference: {rate_per_min: 6, duration_s: {kind: constant, value: 2}, slowdown: {kind: constant, value: 2}}
slo: {p99_ms: 100}
run: {duration_s: 60, replications: 4, seed: 2}
""")
    r = CliRunner().invoke(app, ["run", str(scen), "--prediction-interval", "--no-report", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    import json
    reps = json.loads((tmp_path / "o" / "summary.json").read_text())["metrics"]["stages"]["s"]["p99_ms"]["replications"]
    c, lo, hi = prediction_interval(reps)
    assert f"s P99 {c:.2f} ms, 95% prediction interval for one run [{lo:.2f}, {hi:.2f}] (4 replications)" in r.output


# ------------------------------------------------------------------ between-run level

@pytest.fixture(scope="module")
def levelled_logs(tmp_path_factory, gr_table):
    """Four runs of one system whose in-serving level differs (x1, x1.2, x0.9, x1.1)."""
    root = tmp_path_factory.mktemp("levels")
    levels = {"a": 1.0, "b": 1.2, "c": 0.9, "d": 1.1}
    for k, (name, lv) in enumerate(levels.items()):
        synthetic_log(root / name, gr_table, seconds=40.0, episodes=None, seed=10 + k, level=lv)
    return root, levels


def test_run_level_recovers_each_runs_level(levelled_logs):
    from simrec.fidelity import fit_log, level_of
    root, levels = levelled_logs
    profile, _ = fit_log(load_log(root / "a"))
    got = {n: level_of(profile, load_log(root / n)) for n in levels}
    assert set(got["a"]) == set(got["b"]) and len(got["a"]) >= 2       # one level per size class
    for n, lv in levels.items():
        for cell, x in got[n].items():
            # against the fitted run's own level in the cell (the median of a ratio, not 0);
            # about 4,000 jobs a cell put a median log ratio within ~0.003
            assert x - got["a"][cell] == pytest.approx(math.log(lv), abs=0.01), (n, cell)


def test_with_levels_pools_the_between_run_spread(levelled_logs):
    from simrec.fidelity import fit_log, levelled
    root, levels = levelled_logs
    logs = [load_log(root / n) for n in levels]
    profile = levelled(fit_log(logs[0])[0], logs)
    lv = profile.info["level"]
    logs_of = lv["log_levels"]
    cells = lv["centre_log"]
    assert all(c.startswith("full_forward|") for c in cells)     # the profile's own phase only
    for c in cells:
        # centred on the fitted run ("a"): the profile embodies its level
        assert lv["centre_log"][c] == pytest.approx(logs_of["a"][c], abs=1e-6) and lv["runs_per_cell"][c] == 4
    dev = [logs_of[r][c] - np.mean([logs_of[q][c] for q in levels]) for r in levels for c in cells]
    assert lv["df"] == 3 * len(cells)
    assert lv["sd_log"] == pytest.approx(math.sqrt(np.sum(np.square(dev)) / lv["df"]), abs=1e-5)
    assert lv["spread_log"] == pytest.approx(lv["sd_log"] * math.sqrt(2), abs=1e-5)   # u_new - u_fit
    # the planted levels' own spread (log 1, 1.2, 0.9, 1.1): sd 0.127
    assert lv["sd_log"] == pytest.approx(np.std(np.log(list(levels.values())), ddof=1), abs=0.01)


def test_level_drawn_follows_its_predictive_distribution():
    from simrec.serving_profile import level_drawn
    prof = type("P", (), {"info": {"level": {"centre_log": {"x|0": 0.1}, "runs_per_cell": {"x|0": 4},
                                              "sd_log": 0.2, "spread_log": 0.2 * math.sqrt(2), "df": 9}}})()
    rng = np.random.default_rng(3)
    got = [level_drawn(prof, rng) for _ in range(20_000)]
    assert all(g[""] == 1.0 for g in got)                              # cells without a level
    draws = np.log([g["x|0"] for g in got])
    sd = 0.2 * math.sqrt(2) * math.sqrt(9 / 7)                          # t_9 scaled
    assert draws.mean() == pytest.approx(0.1, abs=4 * sd / math.sqrt(len(draws)))
    assert draws.std() == pytest.approx(sd, rel=0.05)
    assert level_drawn(type("P", (), {"info": {}})(), rng) is None       # no levels: no draw


@pytest.mark.parametrize("bad", [{"centre_log": {"a|0": float("nan")}, "runs_per_cell": {"a|0": 2}, "sd_log": 0.1, "df": 1},
                                 {"centre_log": {"a|0": 0.1}, "runs_per_cell": {"b|0": 2}, "sd_log": 0.1, "df": 1},
                                 {"centre_log": {"a|0": 0.1}, "runs_per_cell": {"a|0": 2}, "sd_log": -1, "df": 1},
                                 {"centre_log": [], "runs_per_cell": {}, "sd_log": None, "df": 0},
                                 "level"])
def test_a_malformed_level_is_one_line(bad, episodic, tmp_path):
    import json
    from simrec.errors import InputError
    from simrec.fidelity import fit_log
    from simrec.serving_profile import Profile
    data = fit_log(load_log(episodic[0]))[0].to_json()
    data["level"] = bad
    with pytest.raises(InputError) as e:
        Profile.from_json(json.loads(json.dumps(data)), "p.json")
    assert str(e.value).startswith("p.json") and "between-run level" in str(e.value) and "\n" not in str(e.value)
