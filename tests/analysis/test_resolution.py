"""Per-channel time resolution, iterative: synthetic planes and the simulated PPS bench."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teststand.analysis.resolution import (
    RESOLUTION_DTYPE,
    GroupSolution,
    ResolutionAccumulator,
    ResolutionSums,
    Tracks,
    fit_resolution,
    resolve_planes,
    select_tracks,
    three_plane_resolution,
)
from teststand.analysis.timewalk import TIMEWALK_DTYPE, correct_timewalk, fit_timewalk
from teststand.core.hits import HIT_DTYPE
from teststand.sim.physics import (
    CHANNEL_DTYPE,
    HPTDC_BIN_NS,
    AcquisitionState,
    HptdcModel,
    demo_hptdc_channels,
)


def gaussian_planes(
    rng: np.random.Generator,
    sigmas_ns: list[float],
    n: int,
    *,
    jitter_ns: float = 0.02,
    offsets_ns: list[float] | None = None,
) -> np.ndarray:
    """(n, planes) times: common jitter per track + independent Gaussian noise per plane."""
    s = np.asarray(sigmas_ns)
    off = np.zeros(s.size) if offsets_ns is None else np.asarray(offsets_ns)
    common = jitter_ns * rng.standard_normal((n, 1))
    return off + common + s * rng.standard_normal((n, s.size))


def effective_sigma_ps(model: HptdcModel, hits: np.ndarray) -> np.ndarray:
    """What the measured resolution of walk-corrected HPTDC times must be, per channel (ps).

    The intrinsic sigma, the 24.4 ps binning of t1 (7.0 ps in quadrature) and the binning of the
    measured ToT through the walk slope (|f'(ToT)| * 7.0 ps, averaged over the channel's hits).
    """
    rows = model.index_of(hits["channel"])
    eps = 1e-4
    slope = (model.walk(rows, hits["tot"] + eps) - model.walk(rows, hits["tot"] - eps)) / (2 * eps)
    slope2 = np.bincount(rows, slope**2, minlength=model.n_channels) / np.bincount(
        rows, minlength=model.n_channels
    )
    q2 = HPTDC_BIN_NS**2 / 12.0
    return np.asarray(1e3 * np.sqrt(model.sigma_ns**2 + q2 + slope2 * q2))


def test_core_width_is_unbiased_for_gaussian_data_and_ignores_tails() -> None:
    rng = np.random.default_rng(0)
    sig = [0.080, 0.060, 0.095, 0.070]
    t = gaussian_planes(rng, sig, 40_000)
    res = resolve_planes(t)
    pulls = (res["sigma_ns"][0] - sig) / res["sigma_err_ns"][0]
    assert np.all(np.abs(pulls) < 3.5), pulls
    # 2 % of tracks with a wild time in one plane barely move the result.
    bad = rng.random(t.shape[0]) < 0.02
    t_bad = t.copy()
    t_bad[bad, 1] += rng.uniform(-5.0, 5.0, bad.sum())
    res_bad = resolve_planes(t_bad)
    np.testing.assert_allclose(res_bad["sigma_ns"][0], res["sigma_ns"][0], rtol=0.03)


def test_three_planes_closed_form_agrees_with_the_iteration() -> None:
    rng = np.random.default_rng(1)
    sig = [0.090, 0.055, 0.075]
    t = gaussian_planes(rng, sig, 30_000)
    closed = three_plane_resolution(t)
    iterative = resolve_planes(t)
    assert closed["flag"].tolist() == [""] * 3
    np.testing.assert_allclose(closed["sigma_ps"], 1e3 * iterative["sigma_ns"][0], rtol=0.01)
    np.testing.assert_allclose(closed["sigma_err_ps"], 1e3 * iterative["sigma_err_ns"][0],
                               rtol=0.25)  # fmt: skip
    pulls = (closed["sigma_ps"] - 1e3 * np.asarray(sig)) / closed["sigma_err_ps"]
    assert np.all(np.abs(pulls) < 3.5)


def test_bootstrap_errors_agree_with_analytic_errors() -> None:
    rng = np.random.default_rng(2)
    t = gaussian_planes(rng, [0.080, 0.060, 0.095, 0.070], 4000)
    analytic = resolve_planes(t)
    boot = resolve_planes(t, errors="bootstrap", n_boot=60, seed=3)
    np.testing.assert_allclose(boot["sigma_ns"], analytic["sigma_ns"])
    # 60 replicas: the bootstrap error itself is known to about 10 %.
    np.testing.assert_allclose(boot["sigma_err_ns"], analytic["sigma_err_ns"], rtol=0.3)
    closed_a = three_plane_resolution(t[:, :3])
    closed_b = three_plane_resolution(t[:, :3], errors="bootstrap", n_boot=60)
    np.testing.assert_allclose(closed_b["sigma_err_ps"], closed_a["sigma_err_ps"], rtol=0.3)


def test_select_tracks_keeps_only_one_hit_per_plane() -> None:
    table = np.zeros(8, dtype=CHANNEL_DTYPE)
    table["channel"] = [10, 11, 12, 13, 20, 21, 22, 23]
    table["plane"] = [0, 1, 2, 3, 0, 1, 2, 3]
    table["bar"] = [0, 0, 0, 0, 1, 1, 1, 1]
    # event 0: column 0 complete, column 1 missing plane 3
    # event 1: column 0 with two hits in plane 2; column 1 complete; a hit of an unknown channel
    # event 2: column 0 complete but one time is NaN
    event = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]
    chan = [10, 11, 12, 13, 20, 21, 22, 10, 11, 12, 12, 13, 20, 21, 22, 23, 99, 10, 11, 12, 13]
    t = np.arange(len(event), dtype=float)
    t[-1] = np.nan
    tracks = select_tracks(event, chan, t, table)
    assert tracks.event.tolist() == [0, 1]
    assert tracks.column.tolist() == [0, 1]
    assert tracks.channel.tolist() == [[10, 11, 12, 13], [20, 21, 22, 23]]
    assert tracks.t_ns.tolist() == [[0.0, 1.0, 2.0, 3.0], [12.0, 13.0, 14.0, 15.0]]
    assert tracks.planes.tolist() == [0, 1, 2, 3]
    # Whole events as tracks: no event has exactly one hit per plane here.
    assert select_tracks(event, chan, t, table, column_field=None).event.size == 0
    # Planes 0-2 only: event 0 column 1 and event 2 (its NaN is in plane 3) qualify too; event 1
    # column 0 still has two hits in plane 2.
    three = select_tracks(event, chan, t, table, planes=[0, 1, 2])
    assert three.event.tolist() == [0, 0, 1, 2]
    assert three.column.tolist() == [0, 1, 1, 0]


def test_resolution_on_the_simulated_bench_within_3_percent() -> None:
    # The acceptance test: 20,000 laser pulses, every pad of 4 planes lit, walk-corrected times.
    table = demo_hptdc_channels()
    model = HptdcModel(table, seed=12)
    hits = model.generate(20_000, AcquisitionState(True, 60.0))
    rows = model.index_of(hits["channel"])
    t_corr = hits["t1"] - model.walk(rows, hits["tot"])  # the true walk, at the measured ToT
    tracks = select_tracks(hits["event"], hits["channel"], t_corr, table)
    res = fit_resolution(tracks, tdc_bin_ns=HPTDC_BIN_NS)
    assert res.dtype == RESOLUTION_DTYPE
    assert res["channel"].tolist() == list(range(16))
    assert res["plane"].tolist() == table["plane"].tolist()
    assert np.all(res["flag"] == "") and np.all(res["n_tracks"] == 20_000)
    expected = effective_sigma_ps(model, hits)
    deviation = res["sigma_ps"] / expected - 1.0
    assert np.all(np.abs(deviation) < 0.03), deviation
    pulls = (res["sigma_ps"] - expected) / res["sigma_err_ps"]
    assert np.all(np.abs(pulls) < 3.0), pulls
    # Removing the t1 binning gets close to the intrinsic sigma (the ToT term stays).
    intrinsic = res["sigma_intrinsic_ps"] / (1e3 * model.sigma_ns) - 1.0
    assert np.all(np.abs(intrinsic) < 0.04)


def test_flags() -> None:
    rng = np.random.default_rng(4)
    table = np.zeros(9, dtype=CHANNEL_DTYPE)
    table["channel"] = np.arange(9)
    table["plane"] = [0, 1, 2, 0, 1, 2, 0, 1, 2]
    table["bar"] = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Column 0: plenty of tracks, plane 0 perfect (sigma 0: its variance comes out near 0 or
    # negative). Column 1: 50 tracks only. Column 2: no hits at all.
    n0, n1 = 5000, 50
    t0 = gaussian_planes(rng, [0.0, 0.08, 0.08], n0)
    t1 = gaussian_planes(rng, [0.07, 0.08, 0.09], n1)
    event = np.concatenate([np.repeat(np.arange(n0), 3), np.repeat(np.arange(n1), 3)])
    chan = np.concatenate([np.tile([0, 1, 2], n0), np.tile([3, 4, 5], n1)])
    times = np.concatenate([t0.ravel(), t1.ravel()])
    tracks = select_tracks(event, chan, times, table)
    res = fit_resolution(tracks, channels=table["channel"])
    flags = res["flag"].tolist()
    assert flags[3:6] == ["too_few_tracks"] * 3 and flags[6:] == ["no_tracks"] * 3
    assert np.isnan(res["sigma_ps"][3:]).all()
    assert res["n_tracks"].tolist()[3:] == [50, 50, 50, 0, 0, 0]
    assert flags[1:3] == ["", ""]
    if flags[0] == "negative_variance":
        assert np.isnan(res["sigma_ps"][0])
    else:
        assert flags[0] == "" and res["sigma_ps"][0] < 3 * res["sigma_err_ps"][0] + 10.0
    # Two planes cannot be separated.
    two = select_tracks(event, chan, times, table, planes=[0, 1])
    res2 = fit_resolution(two)
    assert set(res2["flag"]) == {"too_few_planes"}
    with pytest.raises(ValueError, match="n_planes >= 3"):
        resolve_planes(np.zeros((10, 2)))


def test_channels_in_several_combinations_are_combined() -> None:
    rng = np.random.default_rng(5)
    table = np.zeros(4, dtype=CHANNEL_DTYPE)
    table["channel"] = [0, 1, 2, 3]
    table["plane"] = [0, 1, 2, 2]
    # Tracks through (0, 1, 2) and through (0, 1, 3): channels 0 and 1 are measured twice.
    n = 6000
    a = gaussian_planes(rng, [0.06, 0.08, 0.07], n)
    b = gaussian_planes(rng, [0.06, 0.08, 0.09], n)
    event = np.repeat(np.arange(2 * n), 3)
    chan = np.concatenate([np.tile([0, 1, 2], n), np.tile([0, 1, 3], n)])
    tracks = select_tracks(event, chan, np.concatenate([a.ravel(), b.ravel()]), table,
                           column_field=None)  # fmt: skip
    res = fit_resolution(tracks)
    assert res["n_tracks"].tolist() == [2 * n, 2 * n, n, n]
    pulls = (res["sigma_ps"] - [60.0, 80.0, 70.0, 90.0]) / res["sigma_err_ps"]
    assert np.all(np.abs(pulls) < 3.5)


@settings(max_examples=15, deadline=None)
@given(
    sig=st.lists(st.floats(0.03, 0.15), min_size=3, max_size=6),
    offset=st.floats(-100.0, 100.0),
    seed=st.integers(0, 2**16),
)
def test_result_does_not_depend_on_offsets_or_common_jitter(
    sig: list[float], offset: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    t = gaussian_planes(rng, sig, 3000, jitter_ns=0.0)
    shifted = t + offset * np.arange(len(sig)) + rng.normal(0.0, 1.0, (t.shape[0], 1))
    a = resolve_planes(t)
    b = resolve_planes(shifted)
    np.testing.assert_allclose(b["sigma2_ns2"], a["sigma2_ns2"], rtol=1e-6, atol=1e-10)


@pytest.mark.slow
def test_full_chain_with_fitted_walk_and_error_coverage() -> None:
    """Walk run -> fitted sigmoid -> corrected times -> resolution, over several seeds."""
    table = demo_hptdc_channels()
    pulls = []
    for seed in range(6):
        model = HptdcModel(table, seed=100 + seed)
        walk_hits = np.concatenate(
            [model.generate(3000, AcquisitionState(True, float(i)))
             for i in np.linspace(16.4, 100.0, 8)]
        )  # fmt: skip
        const = fit_timewalk(walk_hits["channel"], walk_hits["t1"], walk_hits["tot"])
        hits = model.generate(20_000, AcquisitionState(True, 60.0))
        t_corr = correct_timewalk(hits["channel"], hits["t1"], hits["tot"], const)
        res = fit_resolution(select_tracks(hits["event"], hits["channel"], t_corr, table))
        expected = effective_sigma_ps(model, hits)
        assert np.all(np.abs(res["sigma_ps"] / expected - 1.0) < 0.03)
        pulls.append((res["sigma_ps"] - expected) / res["sigma_err_ps"])
    p = np.concatenate(pulls)
    assert abs(p.mean()) < 0.35 and 0.7 < p.std() < 1.3
    assert np.mean(np.abs(p) < 2.0) > 0.88


# -- running sums and the accumulator ------------------------------------------------------------


def toy_tracks(
    rng: np.random.Generator,
    sigmas_ns: list[float],
    n: int,
    *,
    jitter_ns: float = 0.02,
    uniform: bool = False,
    offsets_ns: list[float] | None = None,
) -> Tracks:
    """Tracks through ``len(sigmas_ns)`` planes, channel ``p`` in plane ``p``."""
    s = np.asarray(sigmas_ns)
    if uniform:  # flat noise of the same rms: lighter tails than a Gaussian
        t = s * np.sqrt(12.0) * (rng.random((n, s.size)) - 0.5)
        t += jitter_ns * rng.standard_normal((n, 1))
        if offsets_ns is not None:
            t += np.asarray(offsets_ns)
    else:
        t = gaussian_planes(rng, list(s), n, jitter_ns=jitter_ns, offsets_ns=offsets_ns)
    planes = np.arange(s.size)
    return Tracks(
        np.arange(n, dtype=np.uint64), np.zeros(n, dtype=np.int64),
        np.broadcast_to(planes, (n, s.size)).copy(), t, planes,
    )  # fmt: skip


def solve_toy(tracks: Tracks, **kwargs: float) -> GroupSolution:
    sums = ResolutionSums(**kwargs)  # type: ignore[arg-type]
    sums.add(tracks)
    (key,) = sums.groups
    sol = sums.solve(key)
    assert sol is not None
    return sol


@pytest.mark.parametrize("uniform", [False, True], ids=["gaussian", "flat"])
def test_sums_are_unbiased_and_their_errors_are_right(uniform: bool) -> None:
    """Toy Monte Carlo: 120 samples of 3000 tracks through four planes."""
    rng = np.random.default_rng(11)
    sig = np.array([0.080, 0.055, 0.095, 0.070])
    sigmas, errors = [], []
    for _ in range(120):
        sol = solve_toy(toy_tracks(rng, list(sig), 3000, uniform=uniform))
        assert sol.converged
        sigmas.append(np.sqrt(sol.sigma2))
        errors.append(sol.sigma_err)
    s, e = np.array(sigmas), np.array(errors)
    spread = s.std(axis=0, ddof=1)
    # unbiased: the mean within 3 standard errors of the truth
    assert np.all(np.abs(s.mean(axis=0) - sig) < 3 * spread / np.sqrt(len(s)))
    # the quoted error is the spread (known to 6.5 % from 120 samples), from the fourth moments:
    # flat noise has lighter tails, and a smaller error than a Gaussian of the same rms
    np.testing.assert_allclose(e.mean(axis=0), spread, rtol=0.2)
    if uniform:
        gaussian = [solve_toy(toy_tracks(rng, list(sig), 3000)).sigma_err for _ in range(5)]
        assert np.all(e.mean(axis=0) < 0.9 * np.mean(gaussian, axis=0))


def test_sums_are_more_precise_than_the_core_fit() -> None:
    rng = np.random.default_rng(12)
    tracks = toy_tracks(rng, [0.080, 0.055, 0.095, 0.070], 20_000)
    sol = solve_toy(tracks)
    core = resolve_planes(tracks.t_ns)
    # The same tracks: agreement within the spread of the difference of the two estimators.
    spread = np.sqrt(core["sigma_err_ns"][0] ** 2 - sol.sigma_err**2)
    assert np.all(np.abs(np.sqrt(sol.sigma2) - core["sigma_ns"][0]) < 3.5 * spread)
    # The full variance inside a wide window against a 2.5 sigma core: sqrt(2/3) of its error.
    np.testing.assert_allclose(sol.sigma_err / core["sigma_err_ns"][0], np.sqrt(2 / 3), rtol=0.1)


def test_three_planes_closed_form_is_the_fixed_point() -> None:
    rng = np.random.default_rng(13)
    tracks = toy_tracks(rng, [0.090, 0.055, 0.075], 30_000)
    sol = solve_toy(tracks)
    # With three planes the iteration's fixed point is the closed form, exactly.
    np.testing.assert_allclose(sol.sigma2_three_plane, sol.sigma2, rtol=1e-8)
    closed = three_plane_resolution(tracks.t_ns)
    pulls = (1e3 * np.sqrt(sol.sigma2) - closed["sigma_ps"]) / closed["sigma_err_ps"]
    assert np.all(np.abs(pulls) < 1.5)


def test_sums_ignore_wild_tracks() -> None:
    rng = np.random.default_rng(14)
    tracks = toy_tracks(rng, [0.080, 0.060, 0.095, 0.070], 40_000)
    clean = solve_toy(tracks)
    t_bad = tracks.t_ns.copy()
    bad = rng.random(t_bad.shape[0]) < 0.02
    t_bad[bad, 1] += rng.uniform(-5.0, 5.0, bad.sum())
    sums = ResolutionSums()
    sums.add(tracks._replace(t_ns=t_bad))
    group = sums.groups[(0, 1, 2, 3)]
    sol = sums.solve((0, 1, 2, 3))
    assert sol is not None
    # The wild tracks are cut (but for the ~8 % shifted by less than ~0.4 ns, 4.6 sigma of the
    # difference); the result stays within its error.
    assert 0.88 * bad.sum() < group.n_outliers <= bad.sum() + 10
    assert np.all(np.abs(np.sqrt(sol.sigma2) - np.sqrt(clean.sigma2)) < 2 * clean.sigma_err)


@settings(max_examples=15, deadline=None)
@given(
    sig=st.lists(st.floats(0.03, 0.15), min_size=3, max_size=6),
    offset=st.floats(-100.0, 100.0),
    seed=st.integers(0, 2**16),
)
def test_sums_do_not_depend_on_offsets_or_common_jitter(
    sig: list[float], offset: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    tracks = toy_tracks(rng, sig, 3000, jitter_ns=0.0)
    shifted = tracks.t_ns + offset * np.arange(len(sig)) + rng.normal(0.0, 1.0, (3000, 1))
    a = solve_toy(tracks)
    b = solve_toy(tracks._replace(t_ns=shifted))
    np.testing.assert_allclose(b.sigma2, a.sigma2, rtol=1e-6, atol=1e-10)


def true_constants(model: HptdcModel) -> np.ndarray:
    """A timewalk constants table holding the simulator's true walk."""
    truth = model.truth()
    c = np.zeros(truth.size, dtype=TIMEWALK_DTYPE)
    for name in c.dtype.names or ():
        if c.dtype[name].kind == "f":
            c[name] = np.nan
    c["channel"] = truth["channel"]
    for name in ("p0_ns", "p1_ns", "p2_ns"):
        c[name] = truth[name]
    c["p3_ns"] = truth["t_inf_ns"]
    c["better"] = "sigmoid"
    return c


def feed_resolution(
    acc: ResolutionAccumulator, steps: list[np.ndarray], blocks: int = 1
) -> ResolutionAccumulator:
    for i, hits in enumerate(steps):
        for block in np.array_split(hits, blocks):
            acc.add_hits(i, block)
        acc.end_step(i, {"index": i, "intensity": 60.0, "n_hits": hits.size})
    return acc


@pytest.fixture(scope="module")
def bench() -> tuple[HptdcModel, np.ndarray]:
    model = HptdcModel(demo_hptdc_channels(), seed=31)
    return model, model.generate(8000, AcquisitionState(True, 60.0))


def test_accumulator_on_the_simulated_bench(bench: tuple[HptdcModel, np.ndarray]) -> None:
    model, hits = bench
    const = true_constants(model)
    acc = feed_resolution(ResolutionAccumulator(model.channels, ["intensity"], constants=const),
                          [hits])  # fmt: skip
    res = acc.fit()
    assert res.dtype == RESOLUTION_DTYPE
    assert np.all(res["flag"] == "") and np.all(res["n_planes"] == 4)
    assert np.all(res["n_tracks"] + res["n_outliers"] == 8000)
    pulls = (res["sigma_ps"] - effective_sigma_ps(model, hits)) / res["sigma_err_ps"]
    assert np.all(np.abs(pulls) < 4.0), pulls
    # Fed again, in blocks: the same numbers, bit for bit (online equals offline).
    again = feed_resolution(
        ResolutionAccumulator(model.channels, ["intensity"], constants=const), [hits], blocks=5
    ).fit()
    assert again.tobytes() == res.tobytes()
    # In four steps the window comes from the first; the result moves by far less than its error.
    steps = [hits[(hits["event"] // 2000) == k] for k in range(4)]
    stepwise = feed_resolution(
        ResolutionAccumulator(model.channels, ["intensity"], constants=const), steps
    ).fit()
    assert np.all(np.abs(stepwise["sigma_ps"] - res["sigma_ps"]) < 0.05 * res["sigma_err_ps"])
    rows = acc.json_rows(res)
    assert set(rows[0]) == {"channel", "sigma_ps", "sigma_err_ps", "plane", "n_tracks", "flag"}
    attrs = acc.attrs()
    assert attrs["walk_corrected"] is True and attrs["n_combinations_solved"] == 4


def test_a_dead_channel_leaves_its_column_to_three_planes(
    bench: tuple[HptdcModel, np.ndarray],
) -> None:
    model, hits = bench
    const = true_constants(model)
    const = const[const["channel"] != 9]  # plane 2, pad 1 (channel = 4 plane + pad): no constants
    hits = hits.copy()
    hits["t1"][hits["channel"] == 10] = np.nan  # plane 2, pad 2: every time NaN
    partly = (hits["channel"] == 11) & (hits["event"] % 3 == 0)
    hits["t1"][partly] = np.nan  # plane 2, pad 3: a third of the times NaN
    res = feed_resolution(
        ResolutionAccumulator(model.channels, ["intensity"], constants=const), [hits]
    ).fit()
    flags = dict(zip(res["channel"].tolist(), res["flag"].tolist(), strict=True))
    assert flags[9] == "no_constants" and flags[10] == "nan_times"
    for c in (9, 10):
        assert np.isnan(res["sigma_ps"][c]) and np.isnan(res["sigma_err_ps"][c])
    # Pads 1 and 2 are measured with their other three planes; pad 3 with fewer tracks.
    expected = effective_sigma_ps(model, hits)
    for c in (1, 5, 13, 2, 6, 14):
        assert flags[c] == "" and res["n_planes"][c] == 3
        assert abs(res["sigma_ps"][c] - expected[c]) < 4 * res["sigma_err_ps"][c]
    assert res["n_planes"][11] == 4 and 5000 < res["n_tracks"][11] < 5600


def test_bad_data_gives_flags(bench: tuple[HptdcModel, np.ndarray]) -> None:
    model, hits = bench
    acc = ResolutionAccumulator(model.channels, ["intensity"], constants=true_constants(model))
    assert set(acc.fit()["flag"]) == {"no_hits"}  # before any step
    feed_resolution(acc, [hits[:0]])  # an empty step
    res = acc.fit()
    assert set(res["flag"]) == {"no_hits"} and np.all(np.isnan(res["sigma_ps"]))
    feed_resolution(acc, [hits[hits["event"] < 150]])  # 150 tracks per column
    res = acc.fit()
    assert set(res["flag"]) == {"too_few_tracks"} and np.all(res["n_tracks"] == 150)
    # Two planes only: nothing to separate.
    two = model.channels[model.channels["plane"] < 2]
    res = feed_resolution(ResolutionAccumulator(two, ["intensity"]), [hits]).fit()
    assert set(res["flag"]) == {"too_few_planes"} and np.all(np.isnan(res["sigma_ps"]))
    # No constants: raw times, every number flagged.
    raw_acc = feed_resolution(ResolutionAccumulator(model.channels, ["intensity"]), [hits])
    raw = raw_acc.fit()
    assert set(raw["flag"]) == {"walk_not_corrected"} and np.all(np.isfinite(raw["sigma_ps"]))
    assert raw_acc.attrs()["walk_corrected"] is False


def test_accumulator_parameters_are_checked() -> None:
    table = demo_hptdc_channels()
    with pytest.raises(ValueError, match="no parameter 'sigma'"):
        ResolutionAccumulator(table, [], sigma=1.0)
    with pytest.raises(ValueError, match="min_planes"):
        ResolutionAccumulator(table, [], min_planes=2.0)
    with pytest.raises(ValueError, match="not a timewalk table"):
        ResolutionAccumulator(table, [], constants=np.zeros(3, dtype=[("channel", "<u2")]))
    with pytest.raises(ValueError, match="window_tail"):
        ResolutionAccumulator(table, [], window_tail=0.7)
    assert all(isinstance(v, float) for v in ResolutionAccumulator.defaults.values())


def test_degenerate_times_are_flagged_not_a_crash() -> None:
    table = demo_hptdc_channels()
    n = 400
    hits = np.zeros(16 * n, dtype=HIT_DTYPE)
    hits["event"] = np.repeat(np.arange(n), 16)
    hits["channel"] = np.tile(np.arange(16), n)
    hits["tot"] = 10.0
    # every time equal: nothing to measure
    acc = feed_resolution(ResolutionAccumulator(table, []), [hits])
    assert set(acc.fit()["flag"]) == {"negative_variance"}
    # plane 0 perfect, the others 50 ps: plane 0 comes out near zero or flagged, never a crash
    rng = np.random.default_rng(0)
    hits["t1"] = np.where(hits["channel"] >= 4, rng.normal(0.0, 0.05, hits.size), 0.0)
    res = feed_resolution(ResolutionAccumulator(table, []), [hits]).fit()
    first = res[:4]
    assert np.all(np.isnan(first["sigma_ps"]) | (first["sigma_ps"] < 15.0))
    assert np.all(np.isnan(first["sigma_ps"]) == (first["flag"] != "walk_not_corrected"))
    assert np.all(np.abs(res["sigma_ps"][4:] / 50.0 - 1.0) < 0.2)
