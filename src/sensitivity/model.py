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
    1. Each column is scaled by a power of two close to the standard deviation of its ``x`` and
       of its ``y`` (exact; it only keeps fourth powers away from overflow and underflow).
    2. The rows are cut into blocks of ``W`` rows; a window ending in block ``k`` lies inside
       blocks ``k-1`` and ``k``.  For the windows ending in block ``k`` the data are shifted by
       the mean ``x`` and mean ``y`` of that pair of blocks, a point close to every such window's
       own mean, so the sums below hardly cancel whatever the level of the series.
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
    All of it is elementwise tensor arithmetic over ``[tickers, rows]`` planes; columns are
    processed in chunks sized for the CPU cache (for the whole memory budget on CUDA).

Accuracy
    Measured on return-like data with gaps: coefficients agree with an exact (50-digit)
    least-squares solution to about 2e-12 relative, and with a per-window statsmodels OLS
    refit to about 5e-12 of ``max(|value|, its standard error)``; standard errors, covariance,
    RSS and R^2 to 1e-12 or better (tests require 1e-8).  When the raw design ``[1, x, x^2]``
    is ill-conditioned (``x`` far from 0) statsmodels is the less accurate of the two.  As for
    every moment-based rolling method, the relative error of RSS (hence of ``s^2`` and the
    standard errors) grows like ``1/(1 - R^2)``: measured about ``4e-15 / (1 - R^2)``, so
    4e-9 at ``R^2 = 1 - 1e-6``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from sensitivity.errors import ConfigError, DataValidationError

__all__ = [
    "COV_ENTRIES",
    "RCOND_MIN",
    "VARIANCE_RATIO_MIN",
    "QuadraticFit",
    "check_window",
    "default_chunk_size",
    "quadratic_fit",
]

#: Smallest reciprocal condition number of the standardised centred design accepted.
#:
#: With ``z = (x - mean x) / sd(x)`` over the window, the design ``(1, z, z**2 - 1)`` has the
#: moment matrix ``[[1, 0, 0], [0, 1, skew], [0, skew, kurt - 1]]``, whose determinant
#: ``kurt - 1 - skew**2`` is 0 exactly when ``x`` takes fewer than three distinct values (then
#: ``1, x, x**2`` are collinear).  Its reciprocal condition number ``rcond`` (smallest over
#: largest eigenvalue, ``det / lambda_max**2`` here) does not depend on the units or the level
#: of ``x``.  A window is singular when ``rcond < RCOND_MIN * (mean((x - c)**2) / var(x))**2``
#: (``c`` as in :data:`VARIANCE_RATIO_MIN`): the factor is the growth of the rounding error of
#: the centred fourth moment, about 1 for returns.  The rounding noise of ``rcond`` measured on
#: exactly two-valued windows stays below ``3e-11`` times that factor, so the test separates
#: collinear windows from merely ill-conditioned ones with a wide margin; a window passing it
#: keeps at least about eight significant digits in its coefficients.
RCOND_MIN: float = 1e-8

#: Smallest ratio ``var(x) / mean((x - c)**2)`` accepted in a window, ``c`` being the window's
#: shift of step 2 (the mean of the surrounding two blocks).
#:
#: Central moments are formed from shifted raw moments; when ``x`` is nearly constant within the
#: window compared with its distance from ``c`` that conversion cancels digits (the fourth
#: moment loses about ``2*log10(1/ratio)`` of them).  A window below the threshold -- in
#: practice an index that (nearly) did not move for the whole window -- is reported as
#: singular.  Scale-free.
VARIANCE_RATIO_MIN: float = 1e-2

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
#: fraction of its mean square about the window's shift.
_TSS_RATIO_MIN: float = 1e-12

#: Cells (tickers x rows) per chunk on the CPU: the chunk's working set then stays in cache.
_CPU_CHUNK_CELLS: int = 1 << 17

#: Peak number of ``[tickers, rows]`` float64 temporaries of one chunk (an upper estimate).
_TEMPORARIES_PER_CELL: int = 64

#: Budget for one chunk's temporaries on an accelerator, bytes.
_DEVICE_BUDGET_BYTES: int = 1 << 30

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


def default_chunk_size(n_rows: int, device: torch.device | str | None = None) -> int:
    """Columns fitted at once: a cache-sized chunk on the CPU, about 1 GiB of temporaries elsewhere."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    rows = max(1, n_rows)
    if dev.type == "cpu":
        return max(1, _CPU_CHUNK_CELLS // rows)
    return max(1, _DEVICE_BUDGET_BYTES // (rows * _TEMPORARIES_PER_CELL * 8))


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


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor; on the CPU backed by numpy (its large buffers use huge pages)."""
    if device.type == "cpu":
        return torch.from_numpy(np.empty(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype))
    return torch.empty(shape, dtype=dtype, device=device)


def quadratic_fit(
    x: Tensor,
    y: Tensor,
    *,
    window: int,
    min_obs: int,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> QuadraticFit:
    """Fit ``y = alpha + beta*x + gamma*x**2 + e`` by OLS on every row's window, for every column.

    Parameters
    ----------
    x, y
        ``[T, N]`` real tensors: index returns (regressor) and stock returns (response).  Rows
        are the index's trading calendar, oldest first; NaN (any non-finite value) marks a
        missing observation.  Computed in float64 (float32 input is converted).
    window
        Rows per window (``>= 0``); 0 fits once per column over all rows.
    min_obs
        Fewest valid observations a fit needs (``>= 4``, and ``<= window`` when ``window > 0``).
    chunk_size
        Columns processed at once; default: :func:`default_chunk_size`.  Results do not depend
        on it.
    device
        Where to compute (default: CPU); the results stay there.

    Returns
    -------
    QuadraticFit
        Per-row, per-column coefficients, covariance, standard errors, RSS, R^2, the linear
        slope and degrees of freedom; NaN where the fit does not exist.

    Raises
    ------
    ConfigError
        For ``window``, ``min_obs`` or ``chunk_size`` out of range.
    DataValidationError
        For ``x`` or ``y`` of the wrong type, shape or dtype.
    """
    xt = _check_panel("x", x)
    yt = _check_panel("y", y)
    if xt.shape != yt.shape:
        raise DataValidationError(
            f"x and y must have the same shape [T, N], got {tuple(xt.shape)} and {tuple(yt.shape)}"
        )
    w, m = check_window(window, min_obs)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    t_rows, n_cols = (int(s) for s in xt.shape)
    chunk = default_chunk_size(t_rows, dev) if chunk_size is None else _check_int("chunk_size", chunk_size, 1)

    f64 = torch.float64
    # Storage is ticker-major, rows padded to whole blocks, so the kernel writes in place.
    span = w if 0 < w < t_rows else max(t_rows, 1)
    r_store = 1 if w == 0 else -(-t_rows // span) * span
    store = _empty((len(_PLANES) + 6, n_cols, r_store), f64, dev)
    n_store = _empty((n_cols, r_store), torch.int64, dev)
    with torch.no_grad():
        # Ticker-major input rows, so each chunk is a contiguous slice (no-op when already so).
        xT = _ticker_major(xt)
        yT = _ticker_major(yt)
        for c0 in range(0, n_cols if t_rows else 0, chunk):
            c1 = min(n_cols, c0 + chunk)
            xc = xT[c0:c1].to(device=dev, dtype=f64).contiguous()
            yc = yT[c0:c1].to(device=dev, dtype=f64).contiguous()
            _fit_chunk(xc, yc, w, m, store[:, c0:c1], n_store[c0:c1])
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

    A column broadcast along tickers (stride 0) stays a view; chunks materialise it.
    """
    vt = v.T
    if vt.shape[-1] > 1 and vt.stride(-1) != 1 and vt.stride(0) != 0:
        vt = vt.contiguous()
    return vt


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


def _column_scale(v: Tensor, count: Tensor) -> Tensor:
    """``[n, 1]`` powers of two near the standard deviation of each row's non-NaN entries.

    1 where that is undefined or 0.  Scaling by a power of two is exact: it only guards the
    fourth powers against overflow and underflow and changes no rounding.
    """
    safe = count.clamp(min=1.0)
    mean = torch.nansum(v, -1, keepdim=True) / safe
    dev = v - mean
    std = torch.sqrt(torch.nansum(dev * dev, -1, keepdim=True) / safe)
    ok = torch.isfinite(std) & (std > 0)
    return torch.exp2(torch.round(torch.log2(torch.where(ok, std, 1.0))))


def _moment_sums(xb: Tensor, yb: Tensor, cx: Tensor, cy: Tensor, mask: Tensor, total: bool) -> Tensor:
    """Prefix sums (or totals) along the last axis of ``1, x, x^2, x^3, x^4, y, xy, x^2 y, y^2``.

    ``xb``, ``yb``: ``[n, k, L]`` blocks, NaN where there is no observation; they are shifted
    by ``cx``, ``cy`` (``[n, k, 1]``) first.  Returns ``[9, n, k, L]`` (``[9, n, k, 1]`` when
    ``total``).
    """
    v = torch.empty((9, *xb.shape), dtype=xb.dtype, device=xb.device)
    v[0] = mask
    torch.sub(xb, cx, out=v[1]).nan_to_num_(0.0)
    torch.sub(yb, cy, out=v[5]).nan_to_num_(0.0)
    torch.mul(v[1], v[1], out=v[2])
    torch.mul(v[1:3], v[2], out=v[3:5])  # x^3, x^4
    torch.mul(v[1:3], v[5], out=v[6:8])  # xy, x^2 y
    torch.mul(v[5], v[5], out=v[8])
    if total:
        return v.sum(-1, keepdim=True)
    return v.cumsum_(-1)


def _windowed_sums(xm: Tensor, ym: Tensor, mask: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Windowed moment sums ``[9, n, k, L]`` of the locally shifted data, and the shifts.

    ``xm``, ``ym``: ``[n, T]``, NaN where ``mask`` (an observation exists) is false.  Rows are
    cut into ``k`` blocks of ``L`` rows (``L = window``, or ``T`` when the window covers
    everything; the last block is NaN-padded).  Returns ``(sums, cx, cy)`` with the shifts
    ``[n, k, 1]`` used for the windows ending in each block; ``L = 1`` for ``window == 0``
    (the full-sample sums).
    """
    n, t_rows = xm.shape
    span = window if 0 < window < t_rows else t_rows
    kb = -(-t_rows // span)
    rows = kb * span

    def blocks(v: Tensor, fill: float | bool) -> Tensor:
        if rows == t_rows:
            return v.view(n, kb, span)
        out = torch.full((n, rows), fill, dtype=v.dtype, device=v.device)
        out[:, :t_rows] = v
        return out.view(n, kb, span)

    mb = blocks(mask, False)
    xb = blocks(xm, math.nan)
    yb = blocks(ym, math.nan)
    # Shift for the windows ending in block k: the mean over blocks k-1 and k.
    cnt = mb.sum(-1, keepdim=True, dtype=xm.dtype)
    sx = torch.nansum(xb, -1, keepdim=True)
    sy = torch.nansum(yb, -1, keepdim=True)
    if kb > 1:
        cnt[:, 1:] += cnt[:, :-1].clone()
        sx[:, 1:] += sx[:, :-1].clone()
        sy[:, 1:] += sy[:, :-1].clone()
    cnt.clamp_(min=1.0)
    cx = sx.div_(cnt)
    cy = sy.div_(cnt)
    # Prefix sums of block k, shifted by its windows' shift ...
    sums = _moment_sums(xb, yb, cx, cy, mb, total=window == 0)
    if kb > 1:
        # ... plus the part of block k-1 after row j (its total minus its prefix), same shift.
        prev = _moment_sums(xb[:, :-1], yb[:, :-1], cx[:, 1:], cy[:, 1:], mb[:, :-1], total=False)
        tail = sums[:, :, 1:]
        tail += prev[..., -1:]
        tail -= prev
    return sums, cx, cy


def _fit_chunk(x: Tensor, y: Tensor, window: int, min_obs: int, out: Tensor, n_out: Tensor) -> None:
    """The kernel on one chunk of ``n`` columns, stored ticker-major.

    ``x``, ``y``: ``[n, T]`` float64.  Writes ``out`` (``[16, n, R]``: the planes of
    :data:`_PLANES` then the covariance entries of :data:`COV_ENTRIES`) and ``n_out``
    (``[n, R]`` int64); ``R = 1`` when ``window == 0``, else ``T`` rounded up to whole blocks
    (the padding rows hold whatever the arithmetic gives; callers slice them off).
    """
    mask = (x - x == 0) & (y - y == 0)  # both finite
    xm = torch.where(mask, x, math.nan)
    ym = torch.where(mask, y, math.nan)
    count = mask.sum(-1, keepdim=True, dtype=x.dtype)
    kx = _column_scale(xm, count)  # [n, 1]
    ky = _column_scale(ym, count)
    xm.div_(kx)
    ym.div_(ky)
    s, cx, cy = _windowed_sums(xm, ym, mask, window)
    del xm, ym, mask
    kx = kx.unsqueeze(-1)  # [n, 1, 1] to broadcast over [n, k, L]
    ky = ky.unsqueeze(-1)

    # Raw moments of each window (shifted, scaled units).
    nn = s[0]
    a = s[1:] * nn.clamp(min=1.0).reciprocal_()
    del s
    mx, a2, a3, a4, my, axy, ax2y, ayy = a.unbind(0)
    # Central moments of x (u = x - mx) and cross moments with y.
    mx2 = mx * mx
    m2 = a2 - mx2
    m3 = torch.addcmul(a3, mx, torch.sub(a2, mx2, alpha=2.0 / 3.0), value=-3.0)
    m4 = torch.addcmul(a4, mx, a3, value=-4.0).addcmul_(mx2, torch.sub(a2, mx2, alpha=0.5), value=6.0)
    cuy = torch.addcmul(axy, mx, my, value=-1.0)  # mean of u (y - my)
    cqy = torch.addcmul(ax2y, my, a2, value=-1.0).addcmul_(mx, cuy, value=-2.0)  # mean of u^2 (y - my)
    cyy = torch.addcmul(ayy, my, my, value=-1.0).clamp_(min=0.0)
    # Basis (1, u, q) with q = u^2 - m2: 1 is orthogonal to u and q; residualise q on u.
    k4 = torch.addcmul(m4, m2, m2, value=-1.0)  # mean of q^2
    del m4
    proj = m3 / m2  # slope of q on u
    vqq = torch.addcmul(k4, proj, m3, value=-1.0)  # mean of (q - proj u)^2
    # Standardised design (1, z, z^2 - 1): det = kurt - 1 - skew^2 = vqq / m2^2,
    # trace of the 2x2 block = 1 + kurt - 1; rcond = det / lambda_max^2.
    inv_m2sq = (m2 * m2).reciprocal_()
    det = vqq * inv_m2sq
    trace = torch.addcmul(torch.ones_like(k4), k4, inv_m2sq)
    lam_max = torch.addcmul(trace * trace, det, torch.full_like(det, -4.0)).clamp_(min=0.0).sqrt_()
    lam_max.add_(trace).mul_(0.5)
    valid = nn >= min_obs
    valid &= m2 > VARIANCE_RATIO_MIN * a2
    growth = a2 / m2  # rounding growth of the centred moments (1 for a well-centred window)
    valid &= det >= (RCOND_MIN * growth * growth) * (lam_max * lam_max)
    del inv_m2sq, det, trace, lam_max, growth
    tss_ok = cyy > _TSS_RATIO_MIN * ayy
    del a3, a4, axy, ax2y, a2, ayy, a
    # NaN-poison the two pivots where there is no fit: every fitted value inherits the NaN.
    m2 = torch.where(valid, m2, math.nan)
    vqq = torch.where(valid, vqq, math.nan)
    eqy = torch.addcmul(cqy, proj, cuy, value=-1.0)
    del cqy, proj
    gam = eqy / vqq  # coefficient of q after u
    lin = cuy / m2  # slope of the plain linear fit
    bet = torch.addcmul(cuy, m3, gam, value=-1.0).div_(m2)  # coefficient of u
    rss_n = torch.addcmul(cyy, cuy, lin, value=-1.0).addcmul_(eqy, gam, value=-1.0).clamp_(min=0.0)
    del eqy, cuy
    shape = nn.shape

    def dst(name: str) -> Tensor:
        return out[_PLANES.index(name)].view(shape)

    nan = nn.new_tensor(math.nan)
    torch.where(valid, nn - 3.0, nan, out=dst("dof"))
    del valid
    s2_n = rss_n / dst("dof")  # s^2 / n, s^2 = RSS / (n - 3)
    torch.where(tss_ok, 1.0 - rss_n / cyy, nan, out=dst("r2"))
    torch.mul(rss_n.mul_(nn), ky * ky, out=dst("rss"))
    n_out.view(shape).copy_(nn)
    del tss_ok, cyy, rss_n, nn

    # Back to raw units: y = mu_y + b (x - mu_x) + c ((x - mu_x)^2 - v).
    q1 = ky / kx
    q2 = q1 / kx
    torch.mul(lin, q1, out=dst("linear_beta"))
    mu_x = (cx + mx).mul_(kx)
    mu_y = (cy + my).mul_(ky)
    del mx, my, mx2, lin
    b = bet.mul_(q1)
    c = torch.mul(gam, q2, out=dst("gamma"))
    mu2 = mu_x * mu_x
    ja2 = mu2 - (kx * kx) * m2  # mu_x^2 - v
    torch.addcmul(mu_y, b, mu_x, value=-1.0, out=dst("alpha")).addcmul_(c, ja2)
    torch.addcmul(b, c, mu_x, value=-2.0, out=dst("beta"))
    del b, c, mu_y, gam

    # Covariance: block diagonal in the centred basis (1, u, q) ...
    w = s2_n / (m2 * vqq)
    s00 = s2_n.mul_(ky * ky)
    s11 = k4.mul_(w).mul_(q1 * q1)
    s12 = m3.mul_(w).mul_(-q1 * q2)
    c0 = len(_PLANES)
    aa, ab, ag, bb, bg, gg = (out[c0 + i].view(shape) for i in range(6))
    s22 = torch.mul(w.mul_(m2), q2 * q2, out=gg)  # = s2_n / vqq, in raw units
    del m2, vqq, w
    # ... mapped to (alpha, beta, gamma) by rows (1, -mu, mu^2 - v), (0, 1, -2 mu), (0, 0, 1).
    t2 = mu_x * ja2
    torch.addcmul(s00, mu2, s11, out=aa).addcmul_(t2, s12, value=-2.0).addcmul_(ja2 * ja2, s22)
    torch.mul(ja2 + 2.0 * mu2, s12, out=ab).addcmul_(mu_x, s11, value=-1.0).addcmul_(t2, s22, value=-2.0)
    torch.mul(ja2, s22, out=ag).addcmul_(mu_x, s12, value=-1.0)
    torch.addcmul(s11, mu_x, s12, value=-4.0, out=bb).addcmul_(mu2, s22, value=4.0)
    torch.addcmul(s12, mu_x, s22, value=-2.0, out=bg)
    for name, v in (("alpha_se", aa), ("beta_se", bb), ("gamma_se", gg)):
        torch.clamp(v, min=0.0, out=dst(name)).sqrt_()
