"""Cost tables (simrec.calibration.table): interpolation, sampling and validation.

The synthetic tables follow a known power law t(L, M) = A * L^P * M^Q, with every quantile
a fixed multiple of the median. Interpolation is linear in log(time) over log(shape), so a
power law is reproduced exactly (up to float rounding) between grid points and, by the same
linear formula, outside them.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simrec.calibration.table import builtin_tables, COLUMNS, PHASES, load_table, write_table
from simrec.errors import InputError
from simrec.service import FromTable

A, P, Q = 0.002, 1.3, 0.7
L_GRID = (256, 512, 1024, 2048, 4096)
M_GRID = (16, 64, 256)
# Quantile -> multiple of the median; strictly increasing so the inverse CDF is strict.
FACTORS = {0.05: 0.7, 0.25: 0.85, 0.5: 1.0, 0.75: 1.2, 0.95: 1.6, 0.99: 2.0}
QS = np.array(sorted(FACTORS))
FS = np.array([FACTORS[q] for q in QS])

# 1-D phase (prefix_reload: depends on L only): t(L) = B * L^R
B, R = 0.0005, 1.0


def law(L, M):
    return A * L**P * M**Q


def law_1d(L):
    return B * L**R


def power_law_frame() -> pd.DataFrame:
    rows = []
    for L in L_GRID:
        for M in M_GRID:
            for q in QS:
                rows.append(("rank_cached", "isolated", L, M, q, law(L, M) * FACTORS[q], 200))
    for L in L_GRID:
        for q in QS:
            rows.append(("prefix_reload", "isolated", L, 0, q, law_1d(L) * FACTORS[q], 200))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def manifest(name: str = "synthetic") -> dict:
    return {
        "format_version": 1, "name": name, "label": "illustrative",
        "table_file": "table.parquet", "sha256": "0" * 64,
        "device": {"name": "none", "kind": "none"}, "date": "2026-01-01",
        "model": {"arch": "transformer", "layers": 2, "d_model": 64},
        "grid": {"history_len": list(L_GRID), "candidates": list(M_GRID)},
    }


def write_raw(frame: pd.DataFrame, folder: Path, fmt: str = "parquet") -> Path:
    """Write any frame (even one write_table would refuse) plus a matching manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    tpath = folder / f"table.{fmt}"
    if fmt == "csv":
        frame.to_csv(tpath, index=False)
    else:
        frame.to_parquet(tpath, index=False)
    m = {**manifest(), "table_file": tpath.name,
         "sha256": hashlib.sha256(tpath.read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(m))
    return tpath


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("powerlaw")
    write_table(power_law_frame(), folder, manifest())
    return load_table(str(folder))


# ---------------------------------------------------------------- interpolation
INSIDE = [(300, 20), (1000, 100), (3000, 200), (700, 64), (256, 16), (4096, 256), (1500, 17)]
OUTSIDE = [(100, 8), (10_000, 1000), (50, 300), (8192, 10), (3000, 2000), (20_000, 16)]


@pytest.mark.parametrize("L, M", INSIDE)
def test_interpolation_recovers_power_law_inside_grid(table, L, M):
    curve = table.curve("rank_cached")
    assert curve.contains(L, M)
    got = curve.quantile_ms(L, M)
    np.testing.assert_allclose(got, law(L, M) * FS, rtol=1e-9, atol=0)
    assert curve.median_ms(L, M) == pytest.approx(law(L, M), rel=1e-9, abs=0)


@pytest.mark.parametrize("L, M", OUTSIDE)
def test_extrapolation_is_exact_for_a_power_law(table, L, M):
    curve = table.curve("rank_cached")
    assert not curve.contains(L, M)
    np.testing.assert_allclose(curve.quantile_ms(L, M), law(L, M) * FS, rtol=1e-9, atol=0)


def test_out_of_grid_shapes_need_extrapolate(table):
    curve = table.curve("rank_cached")
    L = np.array([300, 100, 1000, 10_000])
    M = np.array([20, 8, 100, 1000])
    strict = FromTable(curve, np.random.default_rng(0), extrapolate=False, where="stages.rank.service")
    with pytest.raises(InputError) as e:
        strict.check(L, M)
    assert str(e.value) == ("stages.rank.service: shape L=100 M=8 is outside the table grid "
                            "(L 256..4096, M 16..256); set extrapolate: true or bound the workload")
    loose = FromTable(curve, np.random.default_rng(0), extrapolate=True, where="stages.rank.service")
    assert loose.check(L, M) == 2


def test_one_dimensional_phase_interpolates_over_L_only(table):
    curve = table.curve("prefix_reload")
    np.testing.assert_array_equal(curve.candidates, [0.0])
    for L in (256, 300, 777, 4096, 100, 9000):
        expected = law_1d(L) * FS
        for M in (0, 1, 64, 5000):  # M is ignored
            assert curve.contains(L, M) == (256 <= L <= 4096)
            np.testing.assert_allclose(curve.quantile_ms(L, M), expected, rtol=1e-9, atol=0)


# ---------------------------------------------------------------- sampling
def test_sample_at_half_is_the_median(table):
    curve = table.curve("rank_cached")
    for L, M in [(512, 64), (1000, 100), (20_000, 8)]:
        assert curve.sample_ms(L, M, 0.5) == pytest.approx(curve.median_ms(L, M), rel=1e-12)
        assert curve.sample_ms(L, M, 0.5) == pytest.approx(law(L, M), rel=1e-9)


def test_inverse_cdf_hits_recorded_quantiles_and_interpolates_in_log_space(table):
    curve = table.curve("rank_cached")
    L, M = 1024, 64
    recorded = law(L, M) * FS
    for q, v in zip(QS, recorded):
        # exact up to the log/exp round trip of the stored values
        assert curve.sample_ms(L, M, q) == pytest.approx(v, rel=1e-12)
    # between recorded quantiles: linear in log(time); halfway is the geometric mean
    i = list(QS).index(0.75)
    mid = (QS[i] + QS[i + 1]) / 2
    assert curve.sample_ms(L, M, mid) == pytest.approx(math.sqrt(recorded[i] * recorded[i + 1]), rel=1e-12)
    # beyond the outermost recorded quantiles the distribution is truncated
    assert curve.sample_ms(L, M, 0.001) == pytest.approx(recorded[0], rel=1e-12)
    assert curve.sample_ms(L, M, 0.9999) == pytest.approx(recorded[-1], rel=1e-12)


def test_uniform_draws_reproduce_recorded_quantiles(table):
    curve = table.curve("rank_cached")
    L, M = 2048, 256
    recorded = dict(zip(QS, law(L, M) * FS))
    n = 20_000
    u = np.random.default_rng(12345).uniform(0, 1, n)
    draws = np.array([curve.sample_ms(L, M, x) for x in u])
    # Between the outermost recorded quantiles the draw is a strictly increasing function of u,
    # so #(draw <= t_q) = #(u <= q) ~ Bin(n, q): the empirical CDF at each recorded quantile
    # must be within 4 binomial sigmas of q. (Above the top quantile the distribution is
    # truncated: the top value is an atom of mass 1 - q_max, checked the same way.)
    def sigma(p):
        return math.sqrt(p * (1 - p) / n)

    for q, v in recorded.items():
        if q == QS[-1]:
            continue
        frac = np.mean(draws <= v * (1 + 1e-12))
        assert abs(frac - q) < 4 * sigma(q), (q, frac)
    lo_atom = np.mean(np.isclose(draws, recorded[QS[0]], rtol=1e-12, atol=0))
    hi_atom = np.mean(np.isclose(draws, recorded[QS[-1]], rtol=1e-12, atol=0))
    assert abs(lo_atom - QS[0]) < 4 * sigma(QS[0])
    assert abs(hi_atom - (1 - QS[-1])) < 4 * sigma(1 - QS[-1])
    q90 = np.quantile(draws, 0.9)
    assert recorded[0.75] < q90 < recorded[0.95]
    assert draws.min() >= recorded[0.05] * (1 - 1e-12)
    assert draws.max() <= recorded[0.99] * (1 + 1e-12)


# ---------------------------------------------------------------- formats
def test_csv_table_loads_like_parquet(tmp_path, table):
    write_raw(power_law_frame(), tmp_path / "csv_table", "csv")
    t = load_table(str(tmp_path / "csv_table"))
    assert t.manifest.table_file == "table.csv"
    for key in [("rank_cached", "isolated"), ("prefix_reload", "isolated")]:
        np.testing.assert_allclose(t.curves[key].log_ms, table.curves[key].log_ms, rtol=1e-12)
    np.testing.assert_allclose(t.curve("rank_cached").quantile_ms(1000, 100), law(1000, 100) * FS,
                               rtol=1e-9)


def test_missing_phase_lists_what_the_table_has(table):
    with pytest.raises(InputError) as e:
        table.curve("full_forward")
    assert ("table has no phase 'full_forward' under condition 'isolated' "
            "(has: prefix_reload/isolated, rank_cached/isolated)") in str(e.value)


# ---------------------------------------------------------------- malformed tables
def _row(frame, phase="rank_cached", L=512, M=64, q=0.75) -> int:
    hit = frame.index[(frame.phase == phase) & (frame.history_len == L) & (frame.candidates == M)
                      & np.isclose(frame["quantile"], q)]
    assert len(hit) == 1
    return int(hit[0])


def _load_error(tmp_path, frame, fmt="parquet") -> tuple[str, Path]:
    tpath = write_raw(frame, tmp_path / "bad", fmt)
    with pytest.raises(InputError) as e:
        load_table(str(tmp_path / "bad"))
    msg = str(e.value)
    assert "\n" not in msg
    return msg, tpath


def test_missing_column(tmp_path):
    msg, tpath = _load_error(tmp_path, power_law_frame().drop(columns=["n_samples"]))
    assert msg == (f"{tpath}: missing column(s): n_samples "
                   f"(need phase, condition, history_len, candidates, quantile, time_ms, n_samples)")


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_nan_time(tmp_path, fmt):
    f = power_law_frame()
    i = _row(f)
    f.loc[i, "time_ms"] = np.nan
    msg, tpath = _load_error(tmp_path, f, fmt)
    where = f"{tpath}:{i + 2}" if fmt == "csv" else str(tpath)
    assert msg.startswith(f"{where} row {i}: time_ms is missing or not a number")


@pytest.mark.parametrize("bad", [0.0, -2.5])
def test_non_positive_time(tmp_path, bad):
    f = power_law_frame()
    i = _row(f)
    f.loc[i, "time_ms"] = bad
    msg, tpath = _load_error(tmp_path, f)
    assert msg == f"{tpath} row {i}: time_ms must be > 0 (got {bad})"


def test_infinite_time(tmp_path):
    f = power_law_frame()
    i = _row(f)
    f.loc[i, "time_ms"] = np.inf
    msg, tpath = _load_error(tmp_path, f)
    assert msg == f"{tpath} row {i}: time_ms must be finite (got inf)"


def test_bad_csv_row_reports_its_line(tmp_path):
    f = power_law_frame()
    i = _row(f, L=2048, M=256, q=0.95)
    f.loc[i, "time_ms"] = -2.0
    msg, tpath = _load_error(tmp_path, f, "csv")
    # header is line 1, so data row i is line i + 2
    assert msg == f"{tpath}:{i + 2} row {i}: time_ms must be > 0 (got -2.0)"
    lines = tpath.read_text().splitlines()
    assert lines[i + 2 - 1].split(",")[5] == "-2.0"


def test_non_numeric_csv_cell_reports_its_line(tmp_path):
    f = power_law_frame().astype({"history_len": object})
    i = 7
    f.loc[i, "history_len"] = "long"
    msg, tpath = _load_error(tmp_path, f, "csv")
    assert msg == f"{tpath}:{i + 2} row {i}: history_len is missing or not a number (got 'long')"


def test_blank_csv_line_is_reported_at_its_physical_line(tmp_path):
    # Blank lines are kept as rows so line numbers stay physical; the blank row is itself bad.
    folder = tmp_path / "blank"
    write_raw(power_law_frame(), folder, "csv")
    tpath = folder / "table.csv"
    lines = tpath.read_text().splitlines()
    cells = lines[5].split(",")
    cells[5] = "-1.0"
    lines[5] = ",".join(cells)          # data row 4, physical line 6 (7 after the insert)
    lines.insert(3, "")                 # a blank line at physical line 4
    tpath.write_text("\n".join(lines) + "\n")
    m = json.loads((folder / "manifest.json").read_text())
    m["sha256"] = hashlib.sha256(tpath.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError) as e:
        load_table(str(folder))
    assert e.value.line == 4 and "got an empty cell" in e.value.message


def test_duplicate_grid_point(tmp_path):
    f = power_law_frame()
    i = _row(f, L=256, M=16, q=0.5)
    f = pd.concat([f, f.iloc[[i]]], ignore_index=True)
    msg, tpath = _load_error(tmp_path, f)
    assert msg == (f"{tpath} row {len(f) - 1}: grid point given twice: "
                   f"rank_cached/isolated L=256 M=16 q=0.5")


def test_duplicate_grid_point_is_rejected(tmp_path):
    f = power_law_frame()
    i = _row(f, L=256, M=16, q=0.5)
    f = pd.concat([f, f.iloc[[i]]], ignore_index=True)
    write_raw(f, tmp_path / "dup")
    with pytest.raises(InputError) as e:
        load_table(str(tmp_path / "dup"))
    assert "grid point given twice: rank_cached/isolated L=256 M=16" in str(e.value)
    assert e.value.path == f"row {len(f) - 1}"


def test_quantile_out_of_range(tmp_path):
    f = power_law_frame()
    i = _row(f, q=0.99)
    f.loc[i, "quantile"] = 1.0
    msg, tpath = _load_error(tmp_path, f)
    assert msg == f"{tpath} row {i}: quantile must be in (0, 1) (got 1.0)"


def test_unknown_phase(tmp_path):
    f = power_law_frame()
    f.loc[3, "phase"] = "attention"
    msg, tpath = _load_error(tmp_path, f)
    assert msg == f"{tpath} row 3: unknown phase 'attention' (known: {', '.join(PHASES)})"


def test_unknown_condition(tmp_path):
    f = power_law_frame()
    f.loc[5, "condition"] = "warm"
    msg, tpath = _load_error(tmp_path, f)
    assert msg == f"{tpath} row 5: unknown condition 'warm'"


def test_non_rectangular_grid(tmp_path):
    f = power_law_frame()
    gone = (f.phase == "rank_cached") & (f.history_len == 1024) & (f.candidates == 64)
    msg, tpath = _load_error(tmp_path, f[~gone].reset_index(drop=True))
    assert msg == (f"{tpath}: rank_cached/isolated: grid point L=1024 M=64 q=0.05 is missing "
                   f"(grid must be rectangular)")


def test_one_quantile_missing_at_one_point(tmp_path):
    f = power_law_frame()
    f = f.drop(index=_row(f, phase="prefix_reload", L=2048, M=0, q=0.95)).reset_index(drop=True)
    msg, tpath = _load_error(tmp_path, f)
    assert msg == (f"{tpath}: prefix_reload/isolated: grid point L=2048 M=0 q=0.95 is missing "
                   f"(grid must be rectangular)")


def test_missing_median(tmp_path):
    f = power_law_frame()
    f = f[f["quantile"] != 0.5].reset_index(drop=True)
    msg, tpath = _load_error(tmp_path, f)
    assert msg == f"{tpath}: prefix_reload/isolated: quantile 0.5 (the median) is missing"


def test_decreasing_quantiles(tmp_path):
    f = power_law_frame()
    f.loc[_row(f, q=0.75), "time_ms"] *= 0.5   # now below the median at that point
    msg, tpath = _load_error(tmp_path, f)
    assert msg == f"{tpath}: rank_cached/isolated: quantiles are not non-decreasing at some grid point"


def test_zero_mixed_into_a_grid(tmp_path):
    f = power_law_frame()
    f.loc[f.history_len == 256, "history_len"] = 0
    msg, tpath = _load_error(tmp_path, f)
    assert msg == f"{tpath}: prefix_reload/isolated: history_len grid mixes 0 with positive values"


def test_fractional_shape_is_rejected(tmp_path):
    f = power_law_frame().astype({"history_len": float})
    f.loc[f.history_len == 512, "history_len"] = 512.5
    write_raw(f, tmp_path / "frac")
    with pytest.raises(InputError, match="history_len"):
        load_table(str(tmp_path / "frac"))


def test_sha256_mismatch(tmp_path):
    folder = tmp_path / "tampered"
    mpath = write_table(power_law_frame(), folder, manifest())
    said = json.loads(mpath.read_text())["sha256"]
    f = power_law_frame()
    f.loc[0, "time_ms"] *= 1.01
    f.loc[:, list(COLUMNS)].to_parquet(folder / "table.parquet", index=False)
    actual = hashlib.sha256((folder / "table.parquet").read_bytes()).hexdigest()
    with pytest.raises(InputError) as e:
        load_table(str(folder))
    assert str(e.value) == (f"{mpath} sha256: sha256 mismatch: manifest says {said[:12]}..., "
                            f"file is {actual[:12]}...")


def test_missing_manifest(tmp_path):
    folder = tmp_path / "no_manifest"
    folder.mkdir()
    power_law_frame().to_parquet(folder / "table.parquet", index=False)
    with pytest.raises(InputError) as e:
        load_table(str(folder))
    assert str(e.value) == (f"{folder}: no cost table at {folder / 'manifest.json'} "
                            f"(built-in tables: {', '.join(builtin_tables())})")
    assert "illustrative_gr" in builtin_tables()


def test_missing_table_file(tmp_path):
    folder = tmp_path / "no_table"
    mpath = write_table(power_law_frame(), folder, manifest())
    (folder / "table.parquet").unlink()
    with pytest.raises(InputError) as e:
        load_table(str(folder))
    assert str(e.value) == f"{mpath} table_file: table file table.parquet is missing"


def test_manifest_unknown_key(tmp_path):
    folder = tmp_path / "extra_key"
    mpath = write_table(power_law_frame(), folder, manifest())
    m = json.loads(mpath.read_text())
    m["colour"] = "blue"
    mpath.write_text(json.dumps(m))
    with pytest.raises(InputError) as e:
        load_table(str(folder))
    assert str(e.value).startswith(f"{mpath} colour: ")


def test_manifest_invalid_json_reports_line(tmp_path):
    folder = tmp_path / "bad_json"
    mpath = write_table(power_law_frame(), folder, manifest())
    mpath.write_text('{\n  "format_version": 1,\n  "name": oops\n}\n')
    with pytest.raises(InputError) as e:
        load_table(str(folder))
    assert e.value.line == 3
    assert str(e.value).startswith(f"{mpath}:3: invalid JSON: ")


# ---------------------------------------------------------------- shipped table
def test_shipped_illustrative_table():
    t = load_table("illustrative_gr")
    assert t.manifest.label == "illustrative"
    assert t.manifest.name == "illustrative_gr"
    assert t.curves
    for (phase, cond), curve in t.curves.items():
        assert phase in PHASES
        assert 0.5 in curve.quantiles
        assert np.all(np.isfinite(curve.log_ms))
        assert np.all(np.diff(curve.log_ms, axis=2) >= 0)
    ff = t.curve("full_forward")
    np.testing.assert_array_equal(ff.history_len, t.manifest.grid["history_len"])
    np.testing.assert_array_equal(ff.candidates, t.manifest.grid["candidates"])
    # Work grows with the history: the median is increasing in L at fixed M.
    med = [ff.median_ms(L, 256) for L in t.manifest.grid["history_len"]]
    assert all(b > a for a, b in zip(med, med[1:]))
