"""Channel time offsets from laser runs (the ATLAS TileCal method).

Model of the walk-free time of channel ``i`` in laser pulse ``e``:

    t_ie = tau_e + t0_i + delay_i + B(board_i) + noise,

with ``tau_e`` the pulse's own time (laser jitter, common to all channels), ``t0_i`` the channel's
intrinsic offset, ``delay_i`` the light-path delay of its fibre (or cable) from the channel table,
and ``B`` the clock propagation, linear in the readout board's position: ``B = a + s * x_board``.

What is identifiable. ``tau_e`` cancels event by event in ``t_ie - t_ref,e`` (a reference channel,
or the mean of a reference group), which is why the offsets are measured that way; everything
else common to all channels is lost with it, so every offset is relative to the reference. The
table delays are known and removed. What remains per channel is ``t0_i + B(board_i)`` relative to
the reference, and that is exactly identifiable (to its statistical error). Its split into a board
line and a channel part is not identifiable from the data alone: it assumes that the channels'
own ``t0`` do not trend with board position, so that the line fitted through the per-channel
offsets against board position measures the clock propagation ``s`` (its error includes the
scatter of the ``t0`` about the line).

Results (per channel):

* ``offset_ns`` = mean(t_i - t_ref) - (delay_i - delay_ref): the channel's electronic offset
  ``t0 + B`` relative to the reference (the reference's own is 0; for a reference group their
  mean is 0). This is the number to subtract from a channel's times to align it when the light
  path is not there (particles instead of laser). For a simulator whose truth has per-channel
  ``offset = t0 + delay + board_delay``, compare ``offset_ns_i`` with
  ``(offset_i - delay_i) - mean_ref(offset_j - delay_j)``, where ``offset`` must be the walk-free
  time the *input times* have: for HPTDC times corrected with ``keep_offset=True`` that includes
  the sigmoid asymptote (``t_inf = offset + p3``); raw times at one laser intensity include that
  intensity's walk.
* ``offset_raw_ns``: the same before removing the delays.
* ``offset_err_ns``: statistical, from the spread of ``t_i - t_ref``. It includes the
  reference's own noise, which is common to all channels: the errors of two channels are
  correlated through the reference (by ``sigma_ref**2 / N``), so a group reference of several
  channels makes the offsets more independent.
* ``board_term_ns``: the fitted line at the channel's board, ``a + s x``.
* ``residual_ns`` = ``offset_ns - board_term_ns``: the channel's own ``t0`` relative to the mean
  ``t0`` of the channels of its line (what TileCal found synchronised to 0.5 ns rms).

Several lines (TileCal fits four: the clock enters in the middle of each drawer) are fitted when
boards are assigned to segments.

Two entry points share the per-pulse differences (:func:`event_differences`) and the board fit:
:func:`channel_offsets` on hit arrays (iterative clipping, reference groups, board segments), and
:class:`OffsetsAccumulator`, the ``offsets`` method of a ``timing_alignment`` run, which keeps
running sums per channel step by step (online and offline alike) and walk-corrects the times
with AWC constants first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import numpy.typing as npt

from teststand.analysis._grouping import batched_lstsq

from .online import StepAccumulator

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

#: One row per channel (see the module docstring for the meaning of each offset). Errors are
#: statistical; ``rms_ns`` is the spread of ``t_i - t_ref`` (the channels' combined resolution);
#: ``delay_ns`` the relative table delay removed; ``n_events`` the differences used and
#: ``n_rejected`` those left out as outliers. Flags: ``""`` (fine), ``reference`` (a member of
#: the reference); ``no_events``, ``too_few_events`` (offsets NaN); ``no_board_fit`` (offset
#: given, board terms NaN); the ``offsets`` method adds its own (:class:`OffsetsAccumulator`),
#: joined by ``|``. Hits of channels missing from the table are ignored.
OFFSET_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("board", "<i2"),
        ("segment", "<i2"),
        ("n_events", "<i8"),
        ("n_rejected", "<i8"),  # differences left out (beyond the clip or outside the window)
        ("offset_raw_ns", "<f8"),
        ("offset_ns", "<f8"),
        ("offset_err_ns", "<f8"),
        ("rms_ns", "<f8"),
        ("delay_ns", "<f8"),
        ("board_term_ns", "<f8"),
        ("board_term_err_ns", "<f8"),
        ("residual_ns", "<f8"),
        ("flag", "<U64"),
    ]
)

#: One row per board: its position and segment, channels with an offset, and the mean offset of
#: those channels with its error (rms / sqrt(n), TileCal's choice) and rms.
BOARD_DTYPE = np.dtype(
    [
        ("board", "<i2"),
        ("segment", "<i2"),
        ("position", "<f8"),
        ("n_channels", "<i4"),
        ("mean_offset_ns", "<f8"),
        ("mean_offset_err_ns", "<f8"),
        ("rms_ns", "<f8"),
    ]
)

#: One row per segment: the straight line ``offset = intercept + slope * position`` fitted to
#: the channel offsets (equal weights; errors from the scatter about the line), the rms of that
#: scatter and chi2/ndf with the statistical errors alone (far above 1 when the channels' own
#: ``t0`` spread dominates, as expected). Flags: ``""`` (fine), ``one_board`` (slope undetermined),
#: ``too_few_channels``.
BOARD_FIT_DTYPE = np.dtype(
    [
        ("segment", "<i2"),
        ("n_boards", "<i4"),
        ("n_channels", "<i4"),
        ("slope_ns", "<f8"),
        ("slope_err_ns", "<f8"),
        ("intercept_ns", "<f8"),
        ("intercept_err_ns", "<f8"),
        ("residual_rms_ns", "<f8"),
        ("chi2ndf_stat", "<f8"),
        ("flag", "<U24"),
    ]
)


class OffsetResult(NamedTuple):
    """Result of :func:`channel_offsets`: per-channel, per-board and per-segment tables."""

    channels: np.ndarray
    boards: np.ndarray
    board_fit: np.ndarray


def _grouped_median(idx: IntArray, x: FloatArray, n_groups: int) -> FloatArray:
    srt = np.lexsort((x, idx))
    counts = np.bincount(idx, minlength=n_groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    out = np.full(n_groups, np.nan)
    has = counts > 0
    out[has] = x[srt][(starts + (counts - 1) // 2)[has]]
    return out


def clipped_mean(
    idx: npt.ArrayLike,
    x: npt.ArrayLike,
    n_groups: int,
    *,
    clip_sigma: float = 5.0,
    n_iter: int = 5,
) -> tuple[FloatArray, FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """Mean, error of the mean, rms and count per group, ignoring entries beyond ``clip_sigma``.

    Starts from the median and 1.4826 MAD, then iterates mean and rms of the entries within
    ``clip_sigma`` rms of the mean. For Gaussian data at 5 sigma the clipping changes nothing
    measurable; it keeps stray hits (noise in the gate, a second pulse) out of the mean.
    """
    g = np.asarray(idx, dtype=np.intp)
    v = np.asarray(x, dtype=np.float64)
    mu = _grouped_median(g, v, n_groups)
    s = 1.4826 * _grouped_median(g, np.abs(v - mu[g]), n_groups)
    n0 = np.bincount(g, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.sqrt(np.bincount(g, (v - mu[g]) ** 2, minlength=n_groups) / n0)
    s = np.where(s > 0, s, sd)
    n = n0
    for _ in range(n_iter):
        inside = np.abs(v - mu[g]) <= clip_sigma * s[g]
        n = np.bincount(g, inside, minlength=n_groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = np.bincount(g, inside * v, minlength=n_groups) / n
            s = np.sqrt(np.bincount(g, inside * (v - mu[g]) ** 2, minlength=n_groups) / (n - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        err = s / np.sqrt(n)
    return mu, err, s, n.astype(np.int64)


def event_differences(
    event: npt.NDArray[np.int64],
    row: IntArray,
    t: FloatArray,
    ref_rows: IntArray,
    n_rows: int,
) -> tuple[IntArray, FloatArray]:
    """``t - t_ref`` of the same laser pulse, for every usable hit; vectorised over events.

    ``event``, ``row`` (channel row) and ``t`` (finite times) are hit columns. The reference
    time of an event is the mean of the reference rows' hits, counted only when every
    reference row has exactly one hit in it. A row with two hits in an event is ambiguous
    there and skipped. Returns the row and the difference of every usable hit (the reference
    rows included: for a single reference their difference is 0).
    """
    events, ev_idx = np.unique(event, return_inverse=True)
    ev_idx = ev_idx.reshape(-1)
    n_ev = events.size
    # Hits per (event, channel): a channel with two hits in an event is ambiguous there.
    cell = ev_idx.astype(np.int64) * n_rows + row
    _, cell_inv, cell_n = np.unique(cell, return_inverse=True, return_counts=True)
    single = cell_n[cell_inv.reshape(-1)] == 1
    is_ref = np.isin(row, ref_rows)
    ref_hit = single & is_ref
    n_ref = np.bincount(ev_idx[ref_hit], minlength=n_ev)
    with np.errstate(invalid="ignore", divide="ignore"):
        t_ref = np.bincount(ev_idx[ref_hit], t[ref_hit], minlength=n_ev) / n_ref
    good_ev = (n_ref == ref_rows.size) & (
        np.bincount(ev_idx[is_ref], minlength=n_ev) == ref_rows.size
    )
    use = single & good_ev[ev_idx]
    return row[use], t[use] - t_ref[ev_idx[use]]


def channel_offsets(
    event: npt.ArrayLike,
    channel: npt.ArrayLike,
    t_ns: npt.ArrayLike,
    channels: np.ndarray,
    *,
    reference: int | Sequence[int],
    subtract_delay: bool = True,
    board_position: Mapping[int, float] | None = None,
    board_segment: Mapping[int, int] | None = None,
    clip_sigma: float = 5.0,
    min_events: int = 20,
) -> OffsetResult:
    """Measure per-channel offsets against a reference, event by event, and fit the board lines.

    Args:
        event, channel, t_ns: hit columns of a laser run in which every channel is lit (walk-free
            times: walk-corrected, or one fixed intensity; see the module docstring).
        channels: the channel table (``channel``, ``board``, ``delay_ns``).
        reference: reference channel number, or several (their per-event mean is the reference;
            an event counts only when every one of them has exactly one hit).
        subtract_delay: remove the table delays (``delay_ns``) from the offsets.
        board_position: position of each board along the clock line (default: the board number).
        board_segment: segment (separate line) of each board (default: one line).
        clip_sigma: per channel, differences beyond this many rms from the mean are ignored.
        min_events: channels with fewer events are flagged ``too_few_events``.

    Returns:
        :class:`OffsetResult` with :data:`OFFSET_DTYPE` (one row per channel of the table, sorted by
        channel), :data:`BOARD_DTYPE` and :data:`BOARD_FIT_DTYPE` tables.
    """
    table = np.asarray(channels)
    order = np.argsort(table["channel"], kind="stable")
    tab_ch = table["channel"][order].astype(np.int64)
    tab_board = table["board"][order].astype(np.int64)
    tab_delay = table["delay_ns"][order].astype(np.float64)
    n_ch = tab_ch.size
    refs = np.unique(np.atleast_1d(np.asarray(reference, dtype=np.int64)))
    ref_rows = np.searchsorted(tab_ch, refs)
    if (
        refs.size == 0
        or np.any(ref_rows >= n_ch)
        or np.any(tab_ch[np.minimum(ref_rows, n_ch - 1)] != refs)
    ):
        raise ValueError(f"reference channel(s) {refs.tolist()} not in the channel table")

    ev = np.asarray(event).astype(np.int64, copy=False).ravel()
    ch = np.asarray(channel).astype(np.int64, copy=False).ravel()
    t = np.asarray(t_ns, dtype=np.float64).ravel()
    pos = np.clip(np.searchsorted(tab_ch, ch), 0, n_ch - 1)
    ok = (tab_ch[pos] == ch) & np.isfinite(t)
    ev, row, t = ev[ok], pos[ok], t[ok]
    row_use, diff = event_differences(ev, row, t, ref_rows, n_ch)
    mean, err, rms, n = clipped_mean(row_use, diff, n_ch, clip_sigma=clip_sigma)
    n_diff = np.bincount(row_use, minlength=n_ch)

    out = np.zeros(n_ch, dtype=OFFSET_DTYPE)
    for name in out.dtype.names or ():
        if out.dtype[name].kind == "f":
            out[name] = np.nan
    out["channel"] = tab_ch
    out["board"] = tab_board
    out["n_events"] = n
    out["n_rejected"] = n_diff - n
    delay_rel = tab_delay - tab_delay[ref_rows].mean()
    out["delay_ns"] = delay_rel if subtract_delay else 0.0
    enough = n >= max(min_events, 2)
    out["offset_raw_ns"][enough] = mean[enough]
    out["offset_ns"][enough] = mean[enough] - out["delay_ns"][enough]
    out["offset_err_ns"][enough] = err[enough]
    out["rms_ns"][enough] = rms[enough]
    if refs.size == 1:
        # t_ref - t_ref is 0 in every event: exact, no spread.
        out["offset_err_ns"][ref_rows] = np.where(enough[ref_rows], 0.0, np.nan)
    out["flag"] = np.where(n == 0, "no_events", np.where(enough, "", "too_few_events"))
    out["flag"][ref_rows] = np.where(enough[ref_rows], "reference", out["flag"][ref_rows])

    boards, fits = _board_fit(out, board_position, board_segment)
    return OffsetResult(out, boards, fits)


def _board_fit(
    out: np.ndarray,
    board_position: Mapping[int, float] | None,
    board_segment: Mapping[int, int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-board means and the per-segment lines of offset against board position; fills the
    board terms of ``out`` in place."""
    board_ids = np.unique(out["board"].astype(np.int64))
    for name, mapping in (("board_position", board_position), ("board_segment", board_segment)):
        missing = [] if mapping is None else [int(b) for b in board_ids if int(b) not in mapping]
        if missing:
            raise ValueError(f"{name} has no entry for board(s) {missing}")
    position = np.array(
        [float(board_position[b]) if board_position is not None else float(b) for b in board_ids]
    )
    segment = np.array(
        [int(board_segment[b]) if board_segment is not None else 0 for b in board_ids],
        dtype=np.int64,
    )
    b_idx = np.searchsorted(board_ids, out["board"].astype(np.int64))
    out["segment"] = segment[b_idx]
    x = position[b_idx]
    y = out["offset_ns"]
    has = np.isfinite(y)

    boards = np.zeros(board_ids.size, dtype=BOARD_DTYPE)
    boards["board"] = board_ids
    boards["segment"] = segment
    boards["position"] = position
    nb = np.bincount(b_idx[has], minlength=board_ids.size)
    boards["n_channels"] = nb
    with np.errstate(invalid="ignore", divide="ignore"):
        bm = np.bincount(b_idx[has], y[has], minlength=board_ids.size) / nb
        br = np.sqrt(
            np.bincount(b_idx[has], (y[has] - bm[b_idx[has]]) ** 2, minlength=board_ids.size)
            / (nb - 1)
        )
    boards["mean_offset_ns"] = bm
    boards["rms_ns"] = np.where(nb > 1, br, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        boards["mean_offset_err_ns"] = np.where(nb > 1, br / np.sqrt(nb), np.nan)

    segs, seg_idx = np.unique(segment[b_idx], return_inverse=True)
    n_seg = segs.size
    fits = np.zeros(n_seg, dtype=BOARD_FIT_DTYPE)
    for name in fits.dtype.names or ():
        if fits.dtype[name].kind == "f":
            fits[name] = np.nan
    fits["segment"] = segs
    # Ragged segments padded into (n_seg, width) with zero weights for the batched fit.
    ci = np.flatnonzero(has)
    si = seg_idx[ci]
    srt = np.argsort(si, kind="stable")
    ci, si = ci[srt], si[srt]
    counts = np.bincount(si, minlength=n_seg)
    width = max(int(counts.max()) if counts.size else 0, 1)
    slot = np.arange(ci.size) - np.concatenate(([0], np.cumsum(counts)[:-1]))[si]
    xs = np.zeros((n_seg, width))
    ys = np.zeros((n_seg, width))
    ws = np.zeros((n_seg, width))
    es = np.zeros((n_seg, width))
    xs[si, slot], ys[si, slot], ws[si, slot] = x[ci], y[ci], 1.0
    es[si, slot] = out["offset_err_ns"][ci]
    fits["n_channels"] = counts
    fits["n_boards"] = [np.unique(out["board"][ci[si == k]]).size for k in range(n_seg)]
    design = np.stack([np.ones_like(xs), xs], axis=-1)
    fit = batched_lstsq(design, ys, ws)
    ndf = fit.ndf
    with np.errstate(invalid="ignore", divide="ignore"):
        s2 = np.where(ndf > 0, fit.chi2 / ndf, np.nan)  # scatter about the line (weights 1)
        resid = ys - np.einsum("gpi,gi->gp", design, fit.coef)
        # The single reference channel has no statistical error: it does not enter here.
        stat = (ws > 0) & (es > 0)
        chi2_stat = np.sum(np.where(stat, resid**2 / np.where(stat, es**2, 1.0), 0.0), axis=1)
        ndf_stat = stat.sum(axis=1) - 2
    determined = fit.ok & (ndf > 0) & (fits["n_boards"] >= 2)
    fits["flag"] = np.where(
        fits["n_boards"] < 2, "one_board", np.where(determined, "", "too_few_channels")
    )
    d = determined
    fits["intercept_ns"][d] = fit.coef[d, 0]
    fits["slope_ns"][d] = fit.coef[d, 1]
    fits["intercept_err_ns"][d] = np.sqrt(fit.cov[d, 0, 0] * s2[d])
    fits["slope_err_ns"][d] = np.sqrt(fit.cov[d, 1, 1] * s2[d])
    fits["residual_rms_ns"][d] = np.sqrt(s2[d])
    with np.errstate(invalid="ignore", divide="ignore"):
        fits["chi2ndf_stat"][d] = np.where(ndf_stat[d] > 0, chi2_stat[d] / ndf_stat[d], np.nan)

    # Board term of every channel of a determined segment, with its error from the line's
    # covariance (scaled by the scatter).
    seg_ok = d[seg_idx]
    cov = fit.cov * s2[:, None, None]
    c = cov[seg_idx]
    coef = fit.coef[seg_idx]
    term = coef[:, 0] + coef[:, 1] * x
    term_err = np.sqrt(c[:, 0, 0] + 2 * x * c[:, 0, 1] + x**2 * c[:, 1, 1])
    out["board_term_ns"] = np.where(seg_ok, term, np.nan)
    out["board_term_err_ns"] = np.where(seg_ok, term_err, np.nan)
    out["residual_ns"] = np.where(seg_ok, y - term, np.nan)
    no_fit = has & ~seg_ok & np.isin(out["flag"], ("", "reference"))
    out["flag"][no_fit & (out["flag"] == "")] = "no_board_fit"
    return boards, fits


class OffsetsAccumulator(StepAccumulator):
    """The ``offsets`` method: channel offsets from a ``timing_alignment`` run, step by step.

    Every laser step (``laser == 0`` steps are ignored) is reduced at its end: the hits' times
    (``t1``, or the walk-corrected ``t1 - AWC / S(Q)`` when ``constants`` are given), per laser
    pulse the difference to the reference channel (:func:`event_differences`), and per channel
    the count, sum and sum of squares of the differences inside a window. The window is fixed
    per channel at the first step that gives it ``min_events`` differences: centred on their
    median, half-width ``clip_sigma`` times their robust rms (1.4826 MAD) but at least
    ``min_window_ns``; earlier differences of that channel, and those outside the window
    (noise hits, a second pulse), are counted in ``n_rejected``. The result is deterministic
    and the same online and offline.

    What ``offset_ns`` is. With the walk removed, the time of channel ``i`` in pulse ``e`` is
    ``tau_e + t0_i + delay_i + B_i`` (module docstring), so

        offset_ns_i = mean(t_i - t_ref) - (delay_i - delay_ref)
                    = (t0_i + B_i) - (t0_ref + B_ref),

    the channel's walk-free electronic offset (intrinsic ``t0`` plus clock propagation
    ``B = board_delay``) relative to the reference channel; in the simulator's truth that is
    ``(offset_ns - delay_ns)_i - (offset_ns - delay_ns)_ref``, which is what the tests compare
    with. ``board_term_ns`` is the straight line against board position at the channel's board
    (its slope, the clock propagation per board, is in the attributes ``board_slope_ns``) and
    ``residual_ns = offset_ns - board_term_ns`` the channel's own part. Without constants the
    times keep each channel's walk at the run's amplitude: the offsets are then those of that
    amplitude, every channel is flagged ``walk_not_removed`` and the attribute
    ``walk_removed`` is False.

    Parameters: ``constants`` (an AWC table, or None), ``reference`` (channel number, default 0),
    ``clip_sigma`` (5), ``min_window_ns`` (0.5), ``min_events`` (20: fewer differences give
    ``too_few_events``), ``use_trimmed`` (1: the trimmed AWC), ``lsb_uA`` (constants made for
    other thresholds than a step's are not applied: the step's hits of those channels are left
    out and the channels flagged ``thresholds_differ``).

    Flags: ``reference``; ``no_events``, ``too_few_events``, ``no_constants`` (constants given
    but none usable for the channel), ``no_reference`` (the reference channel had no usable
    time; every offset NaN) leave the offset NaN; ``walk_not_removed``, ``thresholds_differ``,
    ``no_board_fit`` and ``nan_times`` (hits with a NaN time left out) are warnings.
    """

    method: ClassVar[str] = "offsets"
    defaults: ClassVar[Mapping[str, Any]] = {
        "constants": None,
        "reference": 0.0,
        "clip_sigma": 5.0,
        "min_window_ns": 0.5,
        "min_events": 20.0,
        "use_trimmed": 0.0,
        "lsb_uA": float("nan"),  # the run's DAC step: the caller gives it
    }
    json_keys: ClassVar[Mapping[str, str]] = {"offset_ns": "offset_ns"}

    def __init__(self, channels: np.ndarray, axes: Sequence[str], **params: Any) -> None:
        super().__init__(channels, axes, **params)
        p = self.params
        table = self.channels
        order = np.argsort(table["channel"], kind="stable")
        self._table = table[order]
        self._numbers = self._table["channel"].astype(np.int64)
        n_ch = self._numbers.size
        reference = float(p["reference"])
        hit = np.flatnonzero(self._numbers == reference)
        if hit.size != 1 or reference != int(reference):
            raise ValueError(f"reference channel {p['reference']!r} is not in the channel table")
        self._ref_row = np.array([int(hit[0])])
        self._row = np.full(max(int(self._numbers.max()) + 1, 65536), -1, dtype=np.intp)
        self._row[self._numbers] = np.arange(n_ch)
        self._has_laser = "laser" in self.axes
        self._has_thr = "thr1" in self.axes and "thr2" in self.axes
        self._corr = None
        if p["constants"] is not None:
            from .walk import AwcCorrection, check_lsb

            check_lsb(p["lsb_uA"])
            self._corr = AwcCorrection(
                np.asarray(p["constants"]),
                self._numbers,
                use_trimmed=bool(float(p["use_trimmed"])),
                lsb_uA=float(p["lsb_uA"]),
            )
        self._center = np.full(n_ch, np.nan)
        self._half = np.full(n_ch, np.nan)
        self._n = np.zeros(n_ch)
        self._s1 = np.zeros(n_ch)  # sums of (diff - center) and its square, inside the window
        self._s2 = np.zeros(n_ch)
        self._rejected = np.zeros(n_ch)
        self._bad = np.zeros(n_ch)
        self._other_thr = np.zeros(n_ch)
        self.last_result: OffsetResult | None = None

    def reduce_step(self, step: int, row: Mapping[str, Any], hits: np.ndarray) -> None:
        if self._has_laser and not row["laser"] > 0:
            return
        n_ch = self._numbers.size
        rows = self._row[hits["channel"]]
        if hits.size and rows.min() < 0:  # channels missing from the table: left out
            hits = hits[rows >= 0]
            rows = rows[rows >= 0]
        t = hits["t1"].astype(np.float64)
        self._bad += np.bincount(rows, weights=~np.isfinite(t), minlength=n_ch)
        if self._corr is not None:
            ok = self._corr.usable
            if self._has_thr:
                ok = self._corr.matching(float(row["thr1"]), float(row["thr2"]))
                other = self._corr.usable & ~ok
                self._other_thr += np.where(other, np.bincount(rows, minlength=n_ch), 0)
            t = self._corr.correct(rows, t, hits["q"], ok)
        good = np.isfinite(t)
        r_use, diff = event_differences(
            hits["event"][good].astype(np.int64), rows[good], t[good], self._ref_row, n_ch
        )
        # a window for the channels that have none yet and enough differences in this step
        count = np.bincount(r_use, minlength=n_ch)
        new = ~np.isfinite(self._center) & (count >= float(self.params["min_events"]))
        if new.any():
            sel = new[r_use]
            center = _grouped_median(r_use[sel], diff[sel], n_ch)
            mad = _grouped_median(r_use[sel], np.abs(diff[sel] - center[r_use[sel]]), n_ch)
            half = np.maximum(
                float(self.params["clip_sigma"]) * 1.4826 * mad,
                float(self.params["min_window_ns"]),
            )
            self._center[new] = center[new]
            self._half[new] = half[new]
        dx = diff - self._center[r_use]
        with np.errstate(invalid="ignore"):
            inside = np.abs(dx) <= self._half[r_use]
        self._rejected += np.bincount(r_use, weights=~inside, minlength=n_ch)
        r_in, dx = r_use[inside], dx[inside]
        self._n += np.bincount(r_in, minlength=n_ch)
        self._s1 += np.bincount(r_in, weights=dx, minlength=n_ch)
        self._s2 += np.bincount(r_in, weights=dx * dx, minlength=n_ch)

    def fit(self) -> np.ndarray:
        """The :data:`OFFSET_DTYPE` table (one row per channel, sorted by channel)."""
        n_ch = self._numbers.size
        n = self._n
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_dx = self._s1 / n
            var = (self._s2 - self._s1 * mean_dx) / (n - 1)
        var = np.where(n > 1, np.maximum(var, 0.0), np.nan)
        mean = self._center + mean_dx
        ref = int(self._ref_row[0])
        tab_delay = self._table["delay_ns"].astype(np.float64)

        out = np.zeros(n_ch, dtype=OFFSET_DTYPE)
        for name in out.dtype.names or ():
            if out.dtype[name].kind == "f":
                out[name] = np.nan
        out["channel"] = self._numbers
        out["board"] = self._table["board"]
        out["n_events"] = n
        out["n_rejected"] = self._rejected
        out["delay_ns"] = tab_delay - tab_delay[ref]
        min_events = max(float(self.params["min_events"]), 2.0)
        reference_ok = n[ref] >= min_events
        enough = (n >= min_events) & reference_ok
        out["offset_raw_ns"][enough] = mean[enough]
        out["offset_ns"][enough] = mean[enough] - out["delay_ns"][enough]
        with np.errstate(invalid="ignore"):
            out["offset_err_ns"][enough] = np.sqrt(var[enough] / n[enough])
            out["rms_ns"][enough] = np.sqrt(var[enough])
        if reference_ok:
            # t_ref - t_ref is 0 in every event: exact, no spread
            out["offset_raw_ns"][ref] = out["offset_ns"][ref] = 0.0
            out["offset_err_ns"][ref] = out["rms_ns"][ref] = 0.0
        out["flag"] = ""
        boards, fits = _board_fit(out, None, None)
        no_board_fit = out["flag"] == "no_board_fit"

        flags: list[list[str]] = [[] for _ in range(n_ch)]
        usable = np.ones(n_ch, dtype=bool) if self._corr is None else self._corr.usable
        for i in range(n_ch):
            f = flags[i]
            if i == ref:
                f.append("reference")
            if not reference_ok:
                f.append("no_reference")
            elif not usable[i]:
                f.append("no_constants")
            elif n[i] == 0 and i != ref:
                f.append("no_events")
            elif not enough[i]:
                f.append("too_few_events")
            if self._corr is None:
                f.append("walk_not_removed")
            if self._other_thr[i] > 0:
                f.append("thresholds_differ")
            if self._bad[i] > 0:
                f.append("nan_times")
            if no_board_fit[i]:
                f.append("no_board_fit")
        out["flag"] = ["|".join(f) for f in flags]
        self.last_result = OffsetResult(out, boards, fits)
        return out

    def attrs(self) -> dict[str, Any]:
        """Reference, whether the walk was removed, and the board line (clock propagation)."""
        if self.last_result is None:
            self.fit()
        assert self.last_result is not None
        fit = self.last_result.board_fit
        out: dict[str, Any] = {
            f"param_{k}": float(v) for k, v in self.params.items() if k != "constants"
        }
        out["reference"] = int(self._numbers[self._ref_row[0]])
        out["walk_removed"] = self._corr is not None
        out["n_steps"] = self.n_steps
        if fit.size == 1:
            for name in ("slope_ns", "slope_err_ns", "intercept_ns", "intercept_err_ns"):
                out[f"board_{name}"] = float(fit[name][0])
            out["board_residual_rms_ns"] = float(fit["residual_rms_ns"][0])
            out["board_fit_flag"] = str(fit["flag"][0])
        return out
