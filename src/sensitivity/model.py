"""The batched rolling quadratic market model, fitted by ordinary least squares in torch.

:func:`quadratic_fit` fits ``y = alpha + beta*x + gamma*x**2 + e`` for every ticker and every
day of a panel at once.  ``x`` and ``y`` are real tensors ``[T, N]`` (rows: the index's trading
calendar, oldest first; columns: tickers), computed in float64; NaN (any non-finite value)
marks a missing observation and an observation counts only where both ``x`` and ``y`` are
finite.  ``x`` may differ per column because each stock is aligned with the index separately.

Windows
    ``window = W > 0``: the fit on row ``t`` uses rows ``max(0, t-W+1) .. t``, so the first rows
    warm up on a growing window, as statsmodels ``RollingOLS(..., min_nobs=min_obs,
    expanding=True)`` does; ``n_obs[t, i]`` counts the valid observations in those rows.
    ``window = 0``: one fit per column over all ``T`` rows, repeated on every row.

Validity
    A fit is reported only where ``n_obs >= min_obs`` and the window's design is well
    conditioned (:data:`RCOND_MIN`, :data:`VARIANCE_RATIO_MIN`); elsewhere every fitted value
    is NaN -- never garbage and never an exception.  ``n_obs`` is always reported.

Algorithm (O(N*T) work, no Python loop over tickers or windows)
    1. Each column is centred on the mean of its valid ``x`` and of its valid ``y`` and scaled
       by a power of two close to their standard deviations (the scaling is exact; it only
       keeps fourth powers away from overflow and underflow).  Centring removes any constant
       level -- returns plus an offset -- before powers are taken, so the sums below hardly
       cancel; for returns every window's own mean is close to the centre.  Rolling fits
       take the means over the column's first :data:`CENTRE_ROWS` rows of data only, so that
       appending rows leaves every earlier row's results unchanged to the bit (full-sample
       fits use every row).
    2. The rows are cut into blocks of ``W`` rows; a window ending in block ``k`` lies inside
       blocks ``k-1`` and ``k``.
    3. The windowed sums of ``1, x, x^2, x^3, x^4, y, xy, x^2 y, y^2`` come from cumulative sums
       that restart at every block: window sum = prefix of block ``k`` through row ``t`` + the
       part of block ``k-1`` after row ``t-W`` (its total minus its prefix).  No sum runs over
       more than two blocks, so rounding does not grow with the length of the series.
    4. Per window the raw moments become central moments and the normal equations are solved in
       the centred, orthogonalised basis ``(1, u, u^2 - m2)`` with ``u = x - mean(x)``: the
       intercept separates and the remaining 2x2 system is solved in closed form (one
       Gram-Schmidt step).  RSS, R^2, the linear slope and the covariance ``s^2 (X'X)^-1`` come
       from the same centred moments; a closed-form linear map takes coefficients and
       covariance back to the raw ``(1, x, x^2)`` parametrisation.
    All of it is elementwise tensor arithmetic over ``[tickers, rows]`` planes.  On the CPU,
    columns go in chunks of about 2^17 cells, each written into a workspace reused from
    chunk to chunk (fresh buffers cost more in page faults than the arithmetic), and the
    chunks run side by side on ``torch.get_num_threads()`` threads, each thread running its
    operations single-threaded: no per-operation fork-join, which stalls when the cores are
    shared.  On CUDA the chunks are large (about 1 GiB of workspace) and run one after the
    other.

Accuracy
    Measured on return-like data with gaps: coefficients agree with an exact (60-digit)
    least-squares solution to about 1e-14 of ``max(|value|, its standard error)``, and with a
    per-window statsmodels OLS refit to about 1e-12 (its own rounding); standard errors,
    covariance, RSS and R^2 to 1e-12 or better (tests require 1e-9: ``tests/test_exactness.py``
    and ``tests/test_scale.py`` cover 30-year series, offsets of up to 100, nearly collinear
    windows, float32 inputs and a 3,000-ticker universe).  When the raw design ``[1, x, x^2]``
    is ill-conditioned (``x`` far from 0) statsmodels is the less accurate of the two.  Near
    collinearity costs digits like ``1.3e-15 / rcond``; :data:`RCOND_MIN` reports windows below
    1e-5 as singular, so what is reported keeps 1e-9.  As for every moment-based rolling method,
    the relative error of RSS (hence of ``s^2`` and the standard errors) grows like
    ``1/(1 - R^2)``: measured about ``4e-15 / (1 - R^2)``, so 4e-9 at ``R^2 = 1 - 1e-6``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from sensitivity.buffers import OutputBuffers, empty
from sensitivity.errors import ConfigError, DataValidationError
from sensitivity.threads import CHUNK_CELLS, for_each_chunk

__all__ = [
    "CENTRE_ROWS",
    "COV_ENTRIES",
    "RCOND_MIN",
    "VARIANCE_RATIO_MIN",
    "DeviceLike",
    "QuadraticFit",
    "check_window",
    "default_chunk_size",
    "quadratic_fit",
    "resolve_device",
    "rolling_anchors",
]

#: Smallest reciprocal condition number of the standardised centred design accepted.
#:
#: With ``z = (x - mean x) / sd(x)`` over the window, the design ``(1, z, z**2 - 1)`` has the
#: moment matrix ``[[1, 0, 0], [0, 1, skew], [0, skew, kurt - 1]]``, whose determinant
#: ``kurt - 1 - skew**2`` is 0 exactly when ``x`` takes fewer than three distinct values (then
#: ``1, x, x**2`` are collinear).  Its reciprocal condition number (smallest over largest
#: eigenvalue) does not depend on the units or the level of ``x``; the kernel estimates it as
#: ``rcond = det / trace**2`` (``trace = kurt``), which is within a factor of 4 of it and never
#: above.  A window is singular when ``rcond < RCOND_MIN * (mean((x - c)**2) / var(x))**2``
#: (``c`` as in :data:`VARIANCE_RATIO_MIN`): the factor is the growth of the rounding error of
#: the centred moments, about 1 for returns.
#:
#: The threshold is set by accuracy, not only by singularity.  Moment sums lose digits in
#: proportion to ``1 / rcond``: measured over windows down to ``rcond = 1e-8``, the coefficient
#: error relative to ``max(|value|, its se)`` stayed below ``1.3e-15 / rcond``.  At ``1e-5``
#: every window that is reported keeps 1e-9 relative (about 1.3e-10 at worst), and the rest are
#: NaN, never inexact.  Real index returns are far above it: a window with a crash of 80
#: standard deviations still has ``rcond`` about 2e-4; only an index that sits within 0.1% of
#: two values for a whole window comes near.  Exactly two-valued windows give ``rcond`` of
#: rounding size (below 3e-11 times the factor), so collinearity is always caught.
RCOND_MIN: float = 1e-5

#: Smallest ratio ``var(x) / mean((x - c)**2)`` accepted in a window, ``c`` being the point the
#: kernel centres the column on (its mean over its first :data:`CENTRE_ROWS` rows of data, or
#: over the whole panel for ``window == 0``).
#:
#: Central moments are formed from moments about ``c``; when ``x`` is nearly constant within the
#: window compared with its distance from ``c`` that conversion cancels digits (the fourth
#: moment loses about ``2*log10(1/ratio)`` of them).  A window below the threshold -- in
#: practice an index that (nearly) did not move for the whole window -- is reported as
#: singular.  Scale-free.
VARIANCE_RATIO_MIN: float = 1e-2

#: Rows, from each column's first valid cell on, whose valid cells a rolling fit centres that
#: column on (``window == 0`` centres on all of them).
#:
#: The centre must not depend on the rows after the ones it is taken from: appending rows to
#: a panel then leaves every earlier row's results unchanged to the bit (tested) for each
#: column whose data began at least this many rows before the first appended row, so a daily
#: run does not rewrite a stock's history in its last digits once it has traded for a year.
#: A year of trading days keeps the centre about as close to every window's mean as the whole
#: column's mean is, for returns; a shorter stretch would bring small windows near
#: :data:`VARIANCE_RATIO_MIN` more often.
CENTRE_ROWS: int = 252

#: Order of the unique covariance entries in :attr:`QuadraticFit.cov_unique`.
COV_ENTRIES: tuple[str, ...] = (
    "alpha_alpha",
    "alpha_beta",
    "alpha_gamma",
    "beta_beta",
    "beta_gamma",
    "gamma_gamma",
)

#: ``y`` counts as constant in a window (R^2 undefined: NaN) when its variance is below this
#: fraction of its mean square about the column's centre.
_TSS_RATIO_MIN: float = 1e-12

#: Float64 planes of one chunk's size held at once by the kernel (its workspace).
_WORKSPACE_PLANES: int = 28

#: Budget for one chunk's workspace on an accelerator, bytes.
_DEVICE_BUDGET_BYTES: int = 1 << 30

#: What ``device`` may be, besides a :class:`torch.device`.
DeviceLike = torch.device | str | None

_COV_INDEX = ((0, 1, 2), (1, 3, 4), (2, 4, 5))


@dataclass(frozen=True, eq=False)
class QuadraticFit:
    """Per-day OLS fits of ``y = alpha + beta*x + gamma*x**2 + e`` for a panel of tickers.

    Every tensor is ``[T, N]`` float64 (rows and columns as the inputs) unless noted, on the
    device the fit ran on.  They are views of one ticker-major storage (for ``window == 0``,
    of one row repeated); treat them as read-only and call ``.contiguous()`` for a copy of
    your own.
    Where the fit does not exist (too few observations or a singular design) every float
    field is NaN; ``n_obs`` is always set.
    """

    #: Rolling window length in rows; 0 means one fit over the whole sample.
    window: int
    #: Fewest observations a fit needs.
    min_obs: int
    #: Number of valid (x, y) observations in each row's window, int64.
    n_obs: Tensor
    #: Intercept.
    alpha: Tensor
    #: Linear coefficient.
    beta: Tensor
    #: Quadratic coefficient.
    gamma: Tensor
    #: Unique entries of the covariance ``s^2 (X'X)^-1`` of ``(alpha, beta, gamma)``,
    #: ``[T, N, 6]`` in the order of :data:`COV_ENTRIES`.
    cov_unique: Tensor
    #: Standard error of alpha.
    alpha_se: Tensor
    #: Standard error of beta.
    beta_se: Tensor
    #: Standard error of gamma.
    gamma_se: Tensor
    #: Residual sum of squares.
    rss: Tensor
    #: Coefficient of determination ``1 - RSS/TSS`` (TSS centred; NaN when y is constant).
    r2: Tensor
    #: Plain OLS slope of y on ``[1, x]`` over the same window and observations.
    linear_beta: Tensor
    #: Residual degrees of freedom ``n_obs - 3`` (float64; NaN where there is no fit).
    dof: Tensor

    @cached_property
    def covariance(self) -> Tensor:
        """The full covariance of ``(alpha, beta, gamma)``, ``[T, N, 3, 3]`` (built on access)."""
        index = torch.tensor(_COV_INDEX, device=self.cov_unique.device)
        return self.cov_unique[..., index]

    @cached_property
    def valid(self) -> Tensor:
        """Boolean ``[T, N]``: where the fit exists (the fitted values are finite)."""
        return torch.isfinite(self.beta)

    @cached_property
    def params(self) -> Tensor:
        """``[T, N, 3]`` stack of ``(alpha, beta, gamma)``."""
        return torch.stack((self.alpha, self.beta, self.gamma), dim=-1)

    @property
    def shape(self) -> tuple[int, int]:
        """``(T, N)``."""
        t, n = self.alpha.shape
        return int(t), int(n)


def default_chunk_size(n_rows: int, device: DeviceLike = None) -> int:
    """Columns fitted at once: a cache-sized chunk on the CPU, about 1 GiB of workspace elsewhere."""
    dev = resolve_device(device)
    rows = max(1, n_rows)
    if dev.type == "cpu":
        return max(1, CHUNK_CELLS // rows)
    return max(1, _DEVICE_BUDGET_BYTES // (rows * _WORKSPACE_PLANES * 8))


def resolve_device(device: DeviceLike) -> torch.device:
    """The torch device for ``device``: ``"auto"`` is CUDA when available, else the CPU.

    None means the CPU.  ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a :class:`torch.device` are
    taken as they are, except that asking for CUDA where torch sees no CUDA device raises
    :class:`~sensitivity.errors.ConfigError` (the results would otherwise silently come from
    elsewhere).
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f'device must be "auto", "cpu" or "cuda" (or a torch device), got {device!r}'
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {str(device)!r} was asked for but torch sees no CUDA device "
            f'(torch {torch.__version__}); use device "auto" or "cpu", or install a CUDA build of torch'
        )
    return dev


def check_window(window: object, min_obs: object) -> tuple[int, int]:
    """Validate ``window`` (``>= 0``) and ``min_obs`` (``>= 4``, ``<= window`` if rolling).

    Raises :class:`~sensitivity.errors.ConfigError` naming the argument and the value.
    """
    w = _check_int("window", window, 0)
    m = _check_int("min_obs", min_obs, 4)
    if w > 0 and m > w:
        raise ConfigError(f"min_obs must be <= window when window > 0, got min_obs={m} > window={w}")
    return w, m


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_panel(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise DataValidationError(f"{name} must be a torch.Tensor [T, N], got {type(value).__name__}")
    if value.ndim != 2:
        raise DataValidationError(f"{name} must be 2-dimensional [T, N], got shape {tuple(value.shape)}")
    if value.is_complex() or value.dtype == torch.bool:
        raise DataValidationError(f"{name} must hold real numbers, got dtype {value.dtype}")
    return value


def quadratic_fit(
    x: Tensor,
    y: Tensor,
    *,
    window: int,
    min_obs: int,
    chunk_size: int | None = None,
    device: DeviceLike = None,
    anchors: Tensor | None = None,
    out: OutputBuffers | None = None,
) -> QuadraticFit:
    """Fit ``y = alpha + beta*x + gamma*x**2 + e`` by OLS on every row's window, for every column.

    Parameters
    ----------
    x, y
        ``[T, N]`` real tensors: index returns (regressor) and stock returns (response).  Rows
        are the index's trading calendar, oldest first; NaN (any non-finite value) marks a
        missing observation.  Computed in float64 (float32 input is converted exactly).
    window
        Rows per window (``>= 0``); 0 fits once per column over all rows.
    min_obs
        Fewest valid observations a fit needs (``>= 4``, and ``<= window`` when ``window > 0``).
    chunk_size
        Columns processed at once; default: :func:`default_chunk_size`.  Results do not depend
        on it.
    device
        Where to compute: ``"cpu"`` (the default, also for None), ``"cuda"`` (or any torch
        device) or ``"auto"`` (CUDA when available); see :func:`resolve_device`.  The results
        stay there.
    anchors
        Rolling fits only: each column's centres and scales (``[4, N]``, from
        :func:`rolling_anchors`) to use instead of those of these rows.  Given the anchors of
        a longer panel and the rows of that panel from a multiple of ``window`` on, every row
        from the second block of ``window`` rows on gets the longer panel's results to the
        bit: how a daily run fits only its latest days.
    out
        Storage to write the results into instead of fresh memory (its buffer ``"fit"``):
        for a loop over ticker groups, see :class:`~sensitivity.buffers.OutputBuffers`.  The
        returned tensors are then views of it, overwritten by the next call with the same
        ``out``; the values are the same bits either way.

    Returns
    -------
    QuadraticFit
        Per-row, per-column coefficients, covariance, standard errors, RSS, R^2, the linear
        slope and degrees of freedom; NaN where the fit does not exist.

    Raises
    ------
    ConfigError
        For ``window``, ``min_obs``, ``chunk_size`` or ``device`` out of range.
    DataValidationError
        For ``x`` or ``y`` of the wrong type, shape or dtype, ``anchors`` of the wrong
        shape or given for ``window == 0``, or ``out`` not an ``OutputBuffers``.
    """
    xt = _check_panel("x", x)
    yt = _check_panel("y", y)
    if xt.shape != yt.shape:
        raise DataValidationError(
            f"x and y must have the same shape [T, N], got {tuple(xt.shape)} and {tuple(yt.shape)}"
        )
    w, m = check_window(window, min_obs)
    dev = resolve_device(device)
    if anchors is not None:
        if w == 0:
            raise DataValidationError("anchors apply to rolling fits only (window > 0)")
        if not isinstance(anchors, Tensor) or tuple(anchors.shape) != (4, int(xt.shape[1])):
            shape = tuple(anchors.shape) if isinstance(anchors, Tensor) else type(anchors).__name__
            raise DataValidationError(f"anchors must be a [4, {int(xt.shape[1])}] tensor, got {shape}")
        anchors = anchors.to(device=dev, dtype=torch.float64)
    t_rows, n_cols = (int(s) for s in xt.shape)
    chunk_size = None if chunk_size is None else _check_int("chunk_size", chunk_size, 1)

    f64 = torch.float64
    # Rows are cut into blocks of `span` rows (the window); storage is ticker-major with the
    # rows padded to whole blocks, so the kernel writes its results in place.
    span = w if 0 < w < t_rows else max(t_rows, 1)
    r_pad = -(-t_rows // span) * span
    chunk = default_chunk_size(r_pad, dev) if chunk_size is None else chunk_size
    chunk = min(chunk, max(n_cols, 1))
    r_out = 1 if w == 0 else r_pad
    shape = (len(_PLANES) + len(COV_ENTRIES), n_cols, r_out)
    if out is None:
        store, n_store = empty(shape, f64, dev), empty((n_cols, r_out), torch.int64, dev)
    else:
        if not isinstance(out, OutputBuffers):
            raise DataValidationError(f"out must be an OutputBuffers or None, got {type(out).__name__}")
        store = out.take("fit", shape, f64, dev)
        n_store = out.take("fit_n_obs", (n_cols, r_out), torch.int64, dev)
    if t_rows and n_cols:
        # Ticker-major input rows, so each chunk is a contiguous slice (no-op when already so).
        xT = _ticker_major(xt)
        yT = _ticker_major(yt)
        local = threading.local()

        def fit_columns(c0: int) -> None:
            ws = getattr(local, "workspace", None)
            if ws is None:
                ws = local.workspace = _Workspace(chunk, r_pad, span, r_out, dev)
            c1 = min(n_cols, c0 + chunk)
            with torch.no_grad():
                _fit_chunk(
                    _chunk_input(xT[c0:c1], dev),
                    _chunk_input(yT[c0:c1], dev),
                    w,
                    m,
                    ws,
                    store[:, c0:c1],
                    n_store[c0:c1],
                    None if anchors is None else anchors[:, c0:c1, None],
                )

        for_each_chunk(fit_columns, range(0, n_cols, chunk), dev, "quadratic-fit")
    if w == 0:
        store = store.expand(-1, -1, t_rows)
        n_store = n_store.expand(-1, t_rows)
    else:
        store = store[..., :t_rows]
        n_store = n_store[..., :t_rows]
    planes = {name: store[i].T for i, name in enumerate(_PLANES)}
    return QuadraticFit(
        window=w,
        min_obs=m,
        n_obs=n_store.T,
        cov_unique=store[len(_PLANES) :].permute(2, 1, 0),
        **planes,
    )


def _ticker_major(v: Tensor) -> Tensor:
    """``[T, N]`` -> ``[N, T]`` with contiguous rows (a view when it already is one).

    A column broadcast along tickers (stride 0) stays a view; chunks read it as it is.
    """
    vt = v.T
    if vt.shape[-1] > 1 and vt.stride(-1) != 1 and vt.stride(0) != 0:
        vt = vt.contiguous()
    return vt


def _chunk_input(v: Tensor, device: torch.device) -> Tensor:
    """A chunk's ``[n, T]`` input on ``device`` in float64 (a view when it already is)."""
    return v.to(device=device, dtype=torch.float64)


#: Order of the float planes in the kernel's output storage (the covariance entries follow).
_PLANES: tuple[str, ...] = (
    "alpha",
    "beta",
    "gamma",
    "alpha_se",
    "beta_se",
    "gamma_se",
    "rss",
    "r2",
    "linear_beta",
    "dof",
)

#: Scratch planes of the solve (see :func:`_solve`).
_SCRATCH_PLANES: int = 9


class _Workspace:
    """Buffers of one chunk, allocated once per :func:`quadratic_fit` call and reused.

    Every step of the kernel writes into these (``out=`` and in-place operations) instead of
    allocating fresh temporaries: on the CPU a fresh buffer of a chunk's size costs page
    faults on first touch, which took longer than the arithmetic itself (measured: 100
    fused multiply-adds on 2^17 float64 cells, 12 ms into fresh tensors, 5 ms into reused ones).
    A chunk of ``n <= chunk`` columns uses the first ``n`` columns of each plane.
    """

    def __init__(self, chunk: int, rows: int, span: int, rows_out: int, device: torch.device) -> None:
        f64 = torch.float64
        self.rows = rows
        self.span = span
        blocks = rows // span
        #: The nine moment planes of the data, then their windowed sums (in place).
        self.moments = torch.empty((9, chunk, rows), dtype=f64, device=device)
        #: Suffix sums of the previous block, for windows that start there.
        self.suffix = torch.empty((9, chunk, rows - span), dtype=f64, device=device)
        #: Scratch planes of the solve (``rows_out`` is 1 for a full-sample fit).
        self.scratch = torch.empty((_SCRATCH_PLANES, chunk, rows_out), dtype=f64, device=device)
        self.flags = torch.empty((3, chunk, rows_out), dtype=torch.bool, device=device)
        self.blocks = blocks


def _fit_chunk(
    x: Tensor,
    y: Tensor,
    window: int,
    min_obs: int,
    ws: _Workspace,
    out: Tensor,
    n_out: Tensor,
    anchors: Tensor | None = None,
) -> None:
    """The kernel on one chunk of ``n`` columns, stored ticker-major.

    ``x``, ``y``: ``[n, T]`` float64.  Writes ``out`` (``[16, n, R]``: the planes of
    :data:`_PLANES` then the covariance entries of :data:`COV_ENTRIES`) and ``n_out``
    (``[n, R]`` int64); ``R = 1`` when ``window == 0``, else ``T`` rounded up to whole blocks
    (the padding rows hold whatever the arithmetic gives; callers slice them off).
    ``anchors``: ``[4, n, 1]`` centres and scales to use (:func:`rolling_anchors`).
    """
    n, t_rows = x.shape
    mom = ws.moments[:, :n]
    # Rolling windows centre each column on its first CENTRE_ROWS rows of data: rows added
    # after those change none of its results, to the bit.
    sums, kx, ky, cx, cy = _moment_planes(x, y, mom, t_rows, CENTRE_ROWS if window > 0 else None, anchors)
    if window == 0:
        sums = torch.empty((9, n, 1), dtype=mom.dtype, device=mom.device)
        for p, total in zip(mom, sums, strict=True):
            torch.sum(p, -1, keepdim=True, out=total)  # the full-sample sums
    elif ws.blocks > 1:
        # Window sums from prefix sums restarted at every block of `window` rows: a window
        # ending on row j of block k = prefix of block k through j + the rows of block k-1
        # after j (its total minus its prefix through j).  No sum spans more than two blocks.
        suffixes = ws.suffix[:, :n]
        for p, suffix in zip(mom, suffixes, strict=True):
            blocked = p.view(n, ws.blocks, ws.span)
            blocked.cumsum_(-1)
            tail = suffix.view(n, ws.blocks - 1, ws.span)
            torch.sub(blocked[:, :-1, -1:], blocked[:, :-1], out=tail)
            blocked[:, 1:] += tail
    else:
        for p in mom:
            p.cumsum_(-1)
    _solve(sums, kx, ky, cx, cy, min_obs, ws.scratch[:, :n], ws.flags[:, :n], out, n_out)


def _early_cells(valid: Tensor, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each column's valid cells among the ``rows`` rows from its first valid one on.

    Returns ``(at, keep, count)``: ``at`` ``[n, rows]`` int64, the row of each slot (the
    first valid row plus the slot number, held at the last row past the panel's end);
    ``keep`` ``[n, rows]`` bool, the slots on a valid cell inside the panel; ``count``
    ``[n, 1]`` float64, the slots kept (at least 1).  A fixed number of slots per column,
    whatever else the chunk holds, so that a reduction over them gives each column the same
    bits in any chunk.
    """
    t_rows = int(valid.shape[-1])
    start = valid.to(torch.uint8).argmax(-1, keepdim=True)  # the first valid row (0 if none)
    at = start + torch.arange(rows, device=valid.device)
    inside = at < t_rows
    at.clamp_(max=t_rows - 1)
    keep = torch.gather(valid, 1, at).logical_and_(inside)
    return at, keep, keep.sum(-1, keepdim=True, dtype=torch.float64).clamp_(min=1.0)


def rolling_anchors(x: Tensor, y: Tensor) -> Tensor:
    """The centres and scales a rolling :func:`quadratic_fit` of ``x``, ``y`` uses per column.

    ``[4, N]`` float64 on the panels' device: ``cx, kx, cy, ky`` of :func:`_moment_planes`,
    from each column's first :data:`CENTRE_ROWS` rows of data.  Pass them as ``anchors`` to
    fit a later stretch of the same panel with the same bits as the whole.
    """
    xt = _check_panel("x", x)
    yt = _check_panel("y", y)
    if xt.shape != yt.shape:
        raise DataValidationError(
            f"x and y must have the same shape [T, N], got {tuple(xt.shape)} and {tuple(yt.shape)}"
        )
    xT = _chunk_input(_ticker_major(xt), xt.device)
    yT = _chunk_input(_ticker_major(yt), yt.device)
    n, t_rows = (int(s) for s in xT.shape)
    if t_rows == 0:
        return xT.new_ones((4, n)).mul_(math.nan)
    with torch.no_grad():
        valid = torch.eq(torch.mul(xT, 0.0).add_(torch.mul(yT, 0.0)), 0.0)
        at, keep, count = _early_cells(valid, CENTRE_ROWS)
        zero = xT.new_zeros(())
        cx, kx = _early_anchor(xT, at, keep, count, zero)
        cy, ky = _early_anchor(yT, at, keep, count, zero)
    return torch.cat((cx, kx, cy, ky), dim=1).T.contiguous()


def _early_anchor(
    raw: Tensor, at: Tensor, keep: Tensor, count: Tensor, zero: Tensor
) -> tuple[Tensor, Tensor]:
    """``(centre, scale)`` (``[n, 1]``) of ``raw`` (``[n, T]``) from its early cells
    (:func:`_early_cells`): the mean and a power of two near the standard deviation about it."""
    early = torch.where(keep, torch.gather(raw.expand(at.shape[0], raw.shape[-1]), 1, at), zero)
    centre = early.sum(-1, keepdim=True).div_(count)
    early.sub_(centre).mul_(early).masked_fill_(~keep, 0.0)
    var = early.sum(-1, keepdim=True).div_(count)
    return centre, _power_of_two_scale(var)


def _power_of_two_scale(var: Tensor) -> Tensor:
    ok = torch.isfinite(var) & (var > 0)
    return torch.exp2(torch.round(0.5 * torch.log2(torch.where(ok, var, 1.0))))


def _moment_planes(
    x: Tensor,
    y: Tensor,
    mom: Tensor,
    t_rows: int,
    early_rows: int | None,
    anchors: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fill ``mom`` (``[9, n, R]``) with ``1, u, u^2, u^3, u^4, v, uv, u^2 v, v^2`` per cell.

    ``u = (x - cx) / kx`` and ``v = (y - cy) / ky`` where both are finite, 0 elsewhere and on
    the padding rows.  ``cx``, ``cy`` are the mean of each column's valid cells -- with
    ``early_rows``, of those among the ``early_rows`` rows from its first valid one on only
    (:func:`_early_cells`) --, ``kx``, ``ky`` powers of two near their standard deviation about
    it (exact scaling: it only keeps fourth powers away from overflow and underflow).
    Centring removes any constant level (returns plus an offset) before powers are taken;
    taking the centre from the early rows keeps each row's results independent of the rows
    added after it once they lie beyond them.  ``anchors`` (``[4, n, 1]``: ``cx, kx, cy,
    ky``) are used as given instead.  Returns ``(mom, kx, ky, cx, cy)``, the last four
    ``[n, 1]``.
    """
    one, u, u2, u3, u4, v, uv, u2v, v2 = mom.unbind(0)
    # A cell is valid where x and y are both finite: x*0 + y*0 is 0 exactly then and NaN
    # otherwise (inf*0 and NaN*0 are NaN).  Four cheap passes; torch.isfinite costs about
    # eight times a multiplication per call.
    zx, zy = u[:, :t_rows], v[:, :t_rows]
    torch.mul(x, 0.0, out=zx)
    torch.mul(y, 0.0, out=zy)
    valid = torch.eq(zx.add_(zy), 0.0)
    if mom.shape[-1] > t_rows:  # padding rows: no observation
        for p in mom:
            p[:, t_rows:] = 0.0
    zero = mom.new_zeros(())
    if anchors is not None:
        given = ((anchors[0], anchors[1]), (anchors[2], anchors[3]))
    elif early_rows is None:
        count = valid.sum(-1, keepdim=True, dtype=torch.float64).clamp_(min=1.0)
    else:
        at, keep, count = _early_cells(valid, early_rows)
    stats = []
    for i, (raw, dst, sq) in enumerate(((x, u, u2), (y, v, v2))):
        d = dst[:, :t_rows]
        s = sq[:, :t_rows]
        if anchors is not None:
            centre, scale = given[i]
        elif early_rows is None:
            torch.where(valid, raw, zero, out=d)
            centre = d.sum(-1, keepdim=True).div_(count)
        else:
            centre, scale = _early_anchor(raw, at, keep, count, zero)
        torch.sub(raw, centre, out=d)
        torch.where(valid, d, zero, out=d)
        torch.mul(d, d, out=s)
        if anchors is None and early_rows is None:
            scale = _power_of_two_scale(s.sum(-1, keepdim=True).div_(count))
        d.div_(scale)
        s.div_(scale * scale)
        stats.append((scale, centre))
    one[:, :t_rows].copy_(valid)
    torch.mul(u2, u, out=u3)
    torch.mul(u2, u2, out=u4)
    torch.mul(u, v, out=uv)
    torch.mul(u2, v, out=u2v)
    (kx, cx), (ky, cy) = stats
    return mom, kx, ky, cx, cy


def _solve(
    sums: Tensor,
    kx: Tensor,
    ky: Tensor,
    cx: Tensor,
    cy: Tensor,
    min_obs: int,
    scratch: Tensor,
    flags: Tensor,
    out: Tensor,
    n_out: Tensor,
) -> None:
    """Per-window OLS from the windowed moment sums ``[9, n, R]`` (overwritten).

    The sums are of the centred, scaled data of :func:`_moment_planes`.  They become raw
    moments, then central moments of ``x`` about the window's own mean and cross moments
    with ``y``; the normal equations are solved in the centred, orthogonalised basis
    ``(1, u, u^2 - m2)`` (the intercept separates; one Gram-Schmidt step solves the rest in
    closed form), and a closed-form linear map takes coefficients and covariance back to the
    raw ``(1, x, x^2)`` parametrisation and units.  Every step writes into ``scratch``,
    ``flags``, ``out`` or the sums themselves.
    """
    shape = sums.shape[1:]
    s = sums
    nn = s[0]
    t0, t1, t2, t3, t4, t5, t6, t7, t8 = (p.view(shape) for p in scratch.unbind(0))
    valid, bad_tss, invalid = (p.view(shape) for p in flags.unbind(0))

    def dst(name: str) -> Tensor:
        return out[_PLANES.index(name)].view(shape)

    aa, ab, ag, bb, bg, gg = (out[len(_PLANES) + i].view(shape) for i in range(len(COV_ENTRIES)))

    # Raw moments of each window (sums / n).
    torch.clamp(nn, min=1.0, out=t0).reciprocal_()
    for p in s[1:]:
        p *= t0
    mx, a2, a3, a4, my, axy, ax2y, ayy = s[1:].unbind(0)
    # Central moments of x (u = x - mx) and cross moments with y, in place of the raw ones.
    mx2 = torch.mul(mx, mx, out=t0)
    torch.sub(a2, mx2, alpha=0.5, out=t2)
    a4.addcmul_(mx, a3, value=-4.0).addcmul_(mx2, t2, value=6.0)  # m4
    torch.sub(a2, mx2, alpha=2.0 / 3.0, out=t2)
    a3.addcmul_(mx, t2, value=-3.0)  # m3
    m3, m4 = a3, a4
    axy.addcmul_(mx, my, value=-1.0)  # cuy: mean of u (y - my)
    cuy = axy
    ax2y.addcmul_(my, a2, value=-1.0).addcmul_(mx, cuy, value=-2.0)  # cqy: mean of u^2 (y - my)
    cqy = ax2y
    torch.mul(ayy, _TSS_RATIO_MIN, out=t2)
    ayy.addcmul_(my, my, value=-1.0).clamp_(min=0.0)  # cyy
    cyy = ayy
    torch.le(cyy, t2, out=bad_tss)  # y (nearly) constant: R^2 undefined
    m2 = torch.sub(a2, mx2, out=t1)
    # Validity: enough observations, x not (nearly) constant ...
    torch.mul(a2, VARIANCE_RATIO_MIN, out=t2)
    torch.gt(m2, t2, out=valid)
    torch.ge(nn, min_obs, out=invalid)
    valid &= invalid
    torch.mul(a2, m4, out=t2)  # (for the conditioning test below)
    # Basis (1, u, q) with q = u^2 - m2: 1 is orthogonal to u and q; residualise q on u.
    k4 = m4.addcmul_(m2, m2, value=-1.0)  # mean of q^2
    proj = torch.div(m3, m2, out=a2)  # slope of q on u
    vqq = torch.addcmul(k4, proj, m3, value=-1.0, out=t3)  # mean of (q - proj u)^2
    # ... and a well-conditioned design: rcond >= RCOND_MIN * growth^2, with rcond estimated
    # as det / trace^2 of the standardised 2x2 block (see RCOND_MIN); multiplied out, that is
    # a2 * m4 * sqrt(RCOND_MIN) <= m2^2 * sqrt(vqq), compared squared:
    # (a2 * m4)^2 * RCOND_MIN <= m2^4 * vqq (False where vqq < 0 or anything is NaN; a square
    # root costs about ten multiplications).  Squaring keeps the order because a2 * m4 > 0
    # wherever the variance test above passed (m4 >= m2^2 > 0), and nothing else is reported.
    t2.mul_(t2).mul_(RCOND_MIN)
    torch.mul(m2, m2, out=t4)
    t4.mul_(t4).mul_(vqq)
    torch.le(t2, t4, out=invalid)
    valid &= invalid
    torch.logical_not(valid, out=invalid)
    # NaN-poison the two pivots where there is no fit: every fitted value inherits the NaN.
    m2.masked_fill_(invalid, math.nan)
    vqq.masked_fill_(invalid, math.nan)
    eqy = cqy.addcmul_(proj, cuy, value=-1.0)  # mean of (q - proj u)(y - my)
    gam = torch.div(eqy, vqq, out=t4)  # coefficient of q after u
    lin = torch.div(cuy, m2, out=t5)  # slope of the plain linear fit
    bet = torch.addcmul(cuy, m3, gam, value=-1.0, out=t6).div_(m2)  # coefficient of u
    rss_n = torch.addcmul(cyy, cuy, lin, value=-1.0, out=t7)
    rss_n.addcmul_(eqy, gam, value=-1.0).clamp_(min=0.0)  # RSS / n
    # R^2, RSS, degrees of freedom, n_obs.
    r2 = torch.div(rss_n, cyy, out=dst("r2"))
    r2.mul_(-1.0).add_(1.0).masked_fill_(bad_tss, math.nan)
    ky2 = ky * ky
    torch.mul(rss_n, nn, out=dst("rss")).mul_(ky2)
    dof = torch.sub(nn, 3.0, out=dst("dof")).masked_fill_(invalid, math.nan)
    s2_n = rss_n.div_(dof)  # s^2 / n, s^2 = RSS / (n - 3)
    n_out.view(shape).copy_(nn)

    # Back to raw units: y = mu_y + b (x - mu_x) + c ((x - mu_x)^2 - v).
    q1 = ky / kx
    q2 = q1 / kx
    torch.mul(lin, q1, out=dst("linear_beta"))
    mu_x = torch.addcmul(cx, mx, kx, out=t5)  # the window's mean of x, raw units
    mu_y = torch.addcmul(cy, my, ky, out=t8)
    b = bet.mul_(q1)
    c = torch.mul(gam, q2, out=dst("gamma"))
    mu2 = torch.mul(mu_x, mu_x, out=t0)
    ja2 = torch.addcmul(mu2, m2, kx * kx, value=-1.0, out=mx)  # mu_x^2 - v
    torch.addcmul(mu_y, b, mu_x, value=-1.0, out=dst("alpha")).addcmul_(c, ja2)
    torch.addcmul(b, c, mu_x, value=-2.0, out=dst("beta"))

    # Covariance: block diagonal in the centred basis (1, u, q) ...
    w = torch.mul(m2, vqq, out=t4)
    torch.div(s2_n, w, out=w)  # s^2 / (n m2 vqq)
    s00 = s2_n.mul_(ky2)
    s11 = k4.mul_(w).mul_(q1 * q1)
    s12 = m3.mul_(w).mul_(-q1 * q2)
    s22 = torch.mul(w, m2, out=gg).mul_(q2 * q2)  # = s2_n / vqq, in raw units
    # ... mapped to (alpha, beta, gamma) by rows (1, -mu, mu^2 - v), (0, 1, -2 mu), (0, 0, 1).
    t2x = torch.mul(mu_x, ja2, out=t6)
    torch.addcmul(s00, mu2, s11, out=aa).addcmul_(t2x, s12, value=-2.0)
    aa.addcmul_(torch.mul(ja2, ja2, out=t8), s22)
    torch.mul(torch.add(ja2, mu2, alpha=2.0, out=t8), s12, out=ab)
    ab.addcmul_(mu_x, s11, value=-1.0).addcmul_(t2x, s22, value=-2.0)
    torch.mul(ja2, s22, out=ag).addcmul_(mu_x, s12, value=-1.0)
    torch.addcmul(s11, mu_x, s12, value=-4.0, out=bb).addcmul_(mu2, s22, value=4.0)
    torch.addcmul(s12, mu_x, s22, value=-2.0, out=bg)
    for name, v in (("alpha_se", aa), ("beta_se", bb), ("gamma_se", gg)):
        torch.clamp(v, min=0.0, out=dst(name)).sqrt_()
