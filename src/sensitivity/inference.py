"""Inference for the rolling quadratic market model: robust covariances, tests and criteria.

The OLS fit (:func:`~sensitivity.model.quadratic_fit`) carries the classical covariance
``s^2 (X'X)^-1``.  This module adds, batched over every ticker and every window (no Python
loop over either):

:func:`robust_covariance`
    The heteroskedasticity-robust White covariance ``HC1`` and the Newey-West ``HAC``
    covariance of ``(alpha, beta, gamma)``, exactly as statsmodels'
    ``OLS(y_w, X_w, missing="drop").fit(cov_type="HC1")`` and
    ``.fit(cov_type="HAC", cov_kwds={"maxlags": L})`` give them on each window's valid rows:

    * ``HC1 = n/(n-3) * (X'X)^-1 (sum_i e_i^2 x_i x_i') (X'X)^-1``;
    * ``HAC = (X'X)^-1 S (X'X)^-1`` with ``S = Gamma_0 + sum_{l=1..L} w_l (Gamma_l + Gamma_l')``,
      ``Gamma_l = sum_i e_i e_{i-l} x_i x_{i-l}'``, Bartlett weights ``w_l = 1 - l/(L+1)`` and
      no small-sample correction (statsmodels' ``use_correction=False`` default).  Lags count
      **observations of the window after its missing rows are dropped** (statsmodels drops
      NaN rows before it fits), so ``e_{i-l}`` is the l-th previous valid observation in the
      same window; a pair that would reach outside the window does not exist.
      ``L`` is ``hac_lags`` when given, else the Newey-West (1994) rule
      ``floor(4 * (n/100)**(2/9))`` on each window's own ``n`` (:func:`newey_west_lags`).

    Each window's valid observations are gathered into a ``[cells, L]`` batch (compacted,
    right-aligned: :func:`gather_windows`), chunked to bound memory, and the sandwich is
    formed in the window's centred, standardised basis ``(1, u, u^2)``,
    ``u = (x - mean x) / sd x``, then mapped back to ``(1, x, x^2)``; the residuals are those
    of a refit in that basis (one step of iterative refinement), which equal the kernel's to
    rounding.  Work is ``O(cells * window * (1 + L))``.

:func:`coefficient_tests`
    ``gamma_t = gamma / gamma_se`` and its two-sided p-value: Student-t with ``n - 3`` degrees
    of freedom for the classical covariance; the standard normal for HC1 and HAC, which is
    statsmodels' convention for robust covariances (``use_t=False``).

:func:`information_criteria`
    The Gaussian AIC of the linear and the quadratic fit of each window as statsmodels'
    ``OLS(...).fit().aic`` computes it, ``n*(log(2*pi) + log(RSS/n) + 1) + 2k``, and their
    difference.  The linear fit's RSS follows from the quadratic fit's by the F-test identity
    ``RSS_lin = RSS_quad * (1 + t^2/(n-3))`` with ``t`` the *classical* t-statistic of gamma.

Every input and output panel is ``[T, N]`` float64 as in :mod:`sensitivity.model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import torch
from torch import Tensor

from sensitivity.errors import ConfigError, DataValidationError
from sensitivity.model import QuadraticFit
from sensitivity.threads import CHUNK_CELLS, for_each_chunk

__all__ = [
    "SE_TYPES",
    "CoefficientInference",
    "CoefficientTests",
    "InformationCriteria",
    "SeType",
    "WindowBatch",
    "classical_inference",
    "coefficient_tests",
    "gather_windows",
    "information_criteria",
    "newey_west_lags",
    "normal_two_sided_p",
    "robust_covariance",
    "student_t_two_sided_p",
]

#: The covariance estimators of the model's ``se`` option.
SeType = Literal["classical", "hc1", "hac"]
SE_TYPES: tuple[str, ...] = get_args(SeType)

#: Cells x window slots gathered per chunk (about a dozen float64 planes of this size live at once).
_CHUNK_SLOTS: int = 1 << 18

_UNIQUE: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


@dataclass(frozen=True, eq=False)
class CoefficientInference:
    """A covariance of ``(alpha, beta, gamma)`` per row and column, and how to test with it.

    Tensors are ``[T, N]`` float64 (``cov_unique``: ``[T, N, 6]`` in the order of
    :data:`sensitivity.model.COV_ENTRIES`), NaN where the fit does not exist.
    """

    #: Which estimator: ``"classical"``, ``"hc1"`` or ``"hac"``.
    se_type: str
    #: Unique entries of the covariance, ``[T, N, 6]``.
    cov_unique: Tensor
    #: Standard errors of alpha, beta, gamma (square roots of the diagonal).
    alpha_se: Tensor
    beta_se: Tensor
    gamma_se: Tensor
    #: Residual degrees of freedom ``n - 3`` (NaN without a fit).
    dof: Tensor
    #: Whether intervals and p-values use Student's t at ``dof`` (else the standard normal).
    use_t: bool
    #: HAC lags used per row (int64, 0 without HAC or without a fit).
    hac_lags: Tensor | None = None

    @cached_property
    def covariance(self) -> Tensor:
        """The full ``[T, N, 3, 3]`` covariance (built on access)."""
        index = torch.tensor(((0, 1, 2), (1, 3, 4), (2, 4, 5)), device=self.cov_unique.device)
        return self.cov_unique[..., index]


def classical_inference(fit: QuadraticFit) -> CoefficientInference:
    """The fit's own classical covariance ``s^2 (X'X)^-1`` (Student-t at ``n - 3``)."""
    return CoefficientInference(
        se_type="classical",
        cov_unique=fit.cov_unique,
        alpha_se=fit.alpha_se,
        beta_se=fit.beta_se,
        gamma_se=fit.gamma_se,
        dof=fit.dof,
        use_t=True,
    )


def check_se_type(se: object) -> str:
    """Validate the ``se`` option (one of :data:`SE_TYPES`)."""
    if not isinstance(se, str) or se not in SE_TYPES:
        raise ConfigError(f"se must be one of {', '.join(repr(s) for s in SE_TYPES)}, got {se!r}")
    return se


def check_hac_lags(hac_lags: object) -> int | None:
    """Validate ``hac_lags``: None (the Newey-West rule) or an integer ``>= 0``."""
    if hac_lags is None:
        return None
    if isinstance(hac_lags, bool) or not isinstance(hac_lags, int):
        raise ConfigError(f"hac_lags must be an integer >= 0 or None, got {hac_lags!r}")
    if hac_lags < 0:
        raise ConfigError(f"hac_lags must be >= 0, got {hac_lags}")
    return int(hac_lags)


def newey_west_lags(n: int) -> int:
    """The Newey-West (1994) automatic lag ``floor(4 * (n / 100) ** (2 / 9))`` for ``n`` observations."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n must be an integer >= 0, got {n!r}")
    return math.floor(4.0 * math.pow(n / 100.0, 2.0 / 9.0))


# --------------------------------------------------------------------------------------------
# Windows as batches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class WindowBatch:
    """The valid observations of ``M`` windows, ``[M, L]``, compacted and right-aligned.

    Slot ``k`` of a window with ``n`` observations holds its ``(k - (L - n))``-th valid
    observation in time order when ``k >= L - n`` (``mask`` true) and 0 elsewhere, so
    neighbouring slots are neighbouring observations once missing rows are dropped.
    """

    x: Tensor
    y: Tensor
    mask: Tensor
    n: Tensor


class _Compacted:
    """Each column's valid observations moved to the front, in time order; ``[n, T]``."""

    def __init__(self, x_nt: Tensor, y_nt: Tensor) -> None:
        valid = torch.isfinite(x_nt) & torch.isfinite(y_nt)
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        self.x = torch.gather(torch.where(valid, x_nt, 0.0), 1, order)
        self.y = torch.gather(torch.where(valid, y_nt, 0.0), 1, order)
        self.count = valid.cumsum(1)  # valid observations in rows 0..t
        self.rows = int(x_nt.shape[1])


def gather_windows(
    x: Tensor, y: Tensor, window: int, columns: Tensor, rows: Tensor, *, _compact: _Compacted | None = None
) -> WindowBatch:
    """The observations of the windows ending on ``rows[m]`` of ``columns[m]``.

    ``x``, ``y``: ``[T, N]`` panels, NaN (non-finite) marking a missing observation (an
    observation needs both).  ``window > 0``: rows ``max(0, t - window + 1) .. t``;
    ``window == 0``: all rows.  ``columns``, ``rows``: int64 ``[M]``.
    """
    comp = _compact if _compact is not None else _Compacted(x.T.to(torch.float64), y.T.to(torch.float64))
    t_rows = comp.rows
    span = t_rows if window == 0 or window > t_rows else window
    if window == 0:
        hi = comp.count[columns, t_rows - 1]
        lo = torch.zeros_like(hi)
    else:
        hi = comp.count[columns, rows]
        before = rows - window
        lo = torch.where(before >= 0, comp.count[columns, before.clamp(min=0)], torch.zeros_like(hi))
    n = hi - lo
    slot = torch.arange(span, device=hi.device)
    idx = (hi[:, None] - span + slot[None, :]).clamp_(min=0)
    mask = slot[None, :] >= (span - n)[:, None]
    col = columns[:, None]
    xw = torch.where(mask, comp.x[col, idx], 0.0)
    yw = torch.where(mask, comp.y[col, idx], 0.0)
    return WindowBatch(x=xw, y=yw, mask=mask, n=n)


def _cells(fit: QuadraticFit) -> tuple[Tensor, Tensor]:
    """(columns, rows) of the fitted cells; for ``window == 0`` one cell (row 0) per column."""
    valid = fit.valid.T  # [N, T]
    if fit.window == 0:
        cols = (
            torch.nonzero(valid[:, 0]).squeeze(1) if valid.shape[1] else valid.new_zeros(0, dtype=torch.int64)
        )
        return cols, torch.zeros_like(cols)
    cols, rows = torch.nonzero(valid, as_tuple=True)
    return cols, rows


def _chunks(total: int, span: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_SLOTS // max(span, 1))
    return [(a, min(total, a + step)) for a in range(0, total, step)]


# --------------------------------------------------------------------------------------------
# The centred, standardised basis
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Basis:
    """Per window: ``(1, u, u^2)``, ``u = (x - mu) / s`` (0 on masked slots), its Gram matrix
    and the map back to ``(1, x, x^2)``.

    The Gram matrix of ``(1, u, u^2)`` is the Hankel matrix of the power sums of ``u``, so every
    moment below is a sum over one ``[M, L]`` plane (no ``[M, L, 3]`` stacks).
    """

    m: Tensor  # [M, L] mask as float
    u: Tensor  # [M, L]
    u2: Tensor  # [M, L]
    gram: Tensor  # [M, 3, 3] = Z'Z
    gram_inv: Tensor  # [M, 3, 3]
    back: Tensor  # [M, 3, 3]: theta_x = back @ theta_z


def _hankel(p0: Tensor, p1: Tensor, p2: Tensor, p3: Tensor, p4: Tensor) -> Tensor:
    """``[[p0, p1, p2], [p1, p2, p3], [p2, p3, p4]]`` for ``[M]`` tensors, as ``[M, 3, 3]``."""
    return torch.stack((p0, p1, p2, p1, p2, p3, p2, p3, p4), dim=-1).view(-1, 3, 3)


def _basis(batch: WindowBatch) -> _Basis:
    m = batch.mask.to(torch.float64)
    nf = batch.n.to(torch.float64).clamp(min=1.0)
    mu = (batch.x * m).sum(1) / nf
    d = (batch.x - mu[:, None]) * m
    s = torch.sqrt((d * d).sum(1) / nf)
    s = torch.where(s > 0, s, 1.0)
    u = d / s[:, None]
    u2 = u * u
    gram = _hankel(nf, u.sum(1), u2.sum(1), (u2 * u).sum(1), (u2 * u2).sum(1))
    gram_inv = torch.linalg.inv(gram)
    # x = mu + s u:  alpha + beta x + gamma x^2 = theta_z . (1, u, u^2) with
    # theta_z = T theta_x,  T = [[1, mu, mu^2], [0, s, 2 s mu], [0, 0, s^2]].
    back = torch.zeros((*mu.shape, 3, 3), dtype=torch.float64, device=mu.device)
    inv_s = 1.0 / s
    r = mu * inv_s
    back[:, 0, 0] = 1.0
    back[:, 0, 1] = -r
    back[:, 0, 2] = r * r
    back[:, 1, 1] = inv_s
    back[:, 1, 2] = -2.0 * r * inv_s
    back[:, 2, 2] = inv_s * inv_s
    return _Basis(m=m, u=u, u2=u2, gram=gram, gram_inv=gram_inv, back=back)


def _project(basis: _Basis, v: Tensor) -> Tensor:
    """``Z'v``: ``[M, 3]``."""
    return torch.stack((v.sum(1), (basis.u * v).sum(1), (basis.u2 * v).sum(1)), dim=-1)


def _residuals(basis: _Basis, y: Tensor, theta: Tensor) -> Tensor:
    """``y - Z theta`` on the valid slots, 0 elsewhere."""
    fitted = theta[:, 0:1] + theta[:, 1:2] * basis.u + theta[:, 2:3] * basis.u2
    return (y - fitted) * basis.m


def _solve(basis: _Basis, y: Tensor) -> tuple[Tensor, Tensor]:
    """Least squares of ``y`` on the basis with one step of iterative refinement.

    Returns ``(theta_z [M, 3], residuals [M, L])`` (residuals 0 on masked slots).
    """
    theta = (basis.gram_inv @ _project(basis, y * basis.m)[..., None]).squeeze(-1)
    e = _residuals(basis, y, theta)
    theta = theta + (basis.gram_inv @ _project(basis, e)[..., None]).squeeze(-1)
    return theta, _residuals(basis, y, theta)


def _to_raw_cov(basis: _Basis, cov_z: Tensor) -> Tensor:
    """``back @ cov_z @ back'`` as ``[M, 6]`` unique entries."""
    cov = basis.back @ cov_z @ basis.back.transpose(1, 2)
    return torch.stack([cov[:, i, j] for i, j in _UNIQUE], dim=-1)


# --------------------------------------------------------------------------------------------
# Robust covariances
# --------------------------------------------------------------------------------------------


def _lag_table(max_n: int, hac_lags: int | None, device: torch.device) -> Tensor:
    """Lags by window size ``n`` (0 .. max_n), int64."""
    if hac_lags is not None:
        return torch.full((max_n + 1,), hac_lags, dtype=torch.int64, device=device)
    return torch.tensor([newey_west_lags(k) for k in range(max_n + 1)], dtype=torch.int64, device=device)


def _sandwich(batch: WindowBatch, se: str, lags: Tensor | None) -> Tensor:
    """The robust covariance of one chunk of windows, ``[M, 6]`` in raw units."""
    basis = _basis(batch)
    _, e = _solve(basis, batch.y)
    e2 = e * e
    e2u2 = e2 * basis.u2
    meat = _hankel(
        e2.sum(1), (e2 * basis.u).sum(1), e2u2.sum(1), (e2u2 * basis.u).sum(1), (e2u2 * basis.u2).sum(1)
    )
    if se == "hac" and lags is not None and lags.numel():
        span = e.shape[1]
        max_lag = min(int(lags.max().item()), span - 1)
        if max_lag > 0:
            scores = torch.stack((e, e * basis.u, e * basis.u2), dim=1)  # [M, 3, L]
            lag_f = lags.to(torch.float64)
            for ell in range(1, max_lag + 1):
                weight = torch.clamp(1.0 - ell / (lag_f + 1.0), min=0.0)  # [M]; 0 beyond a window's L
                g = scores[:, :, ell:] @ scores[:, :, :-ell].transpose(1, 2)
                meat += weight[:, None, None] * (g + g.transpose(1, 2))
    cov_z = basis.gram_inv @ meat @ basis.gram_inv
    if se == "hc1":
        nf = batch.n.to(torch.float64)
        cov_z = cov_z * (nf / (nf - 3.0))[:, None, None]
    return _to_raw_cov(basis, cov_z)


def robust_covariance(
    x: Tensor,
    y: Tensor,
    fit: QuadraticFit,
    *,
    se: str,
    hac_lags: int | None = None,
) -> CoefficientInference:
    """The HC1 or HAC covariance of every fitted window of ``fit`` (or the classical one).

    Parameters
    ----------
    x, y
        The ``[T, N]`` panels ``fit`` was fitted on (NaN marks a missing observation).
    fit
        The OLS fits (:func:`~sensitivity.model.quadratic_fit`); a covariance is computed
        where it has a fit, NaN elsewhere.
    se
        ``"classical"`` (the fit's own covariance), ``"hc1"`` or ``"hac"``.
    hac_lags
        For ``"hac"``: the Bartlett kernel's maximum lag ``L`` (``>= 0``); None applies
        :func:`newey_west_lags` to each window's number of observations.

    Returns
    -------
    CoefficientInference
        The covariance, standard errors and test convention (normal for HC1/HAC).
    """
    kind = check_se_type(se)
    lags_opt = check_hac_lags(hac_lags)
    if kind == "classical":
        return classical_inference(fit)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise DataValidationError(
            f"x and y must be torch tensors [T, N], got {type(x).__name__} and {type(y).__name__}"
        )
    if tuple(y.shape) != fit.shape or tuple(x.shape) != fit.shape:
        raise DataValidationError(
            f"x and y must have the fit's shape {fit.shape}, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    device = fit.beta.device
    t_rows, n_cols = fit.shape
    f64 = torch.float64
    out_rows = 1 if fit.window == 0 else t_rows
    store = torch.full((6, n_cols, out_rows), math.nan, dtype=f64, device=device)
    lag_store = torch.zeros((n_cols, out_rows), dtype=torch.int64, device=device)
    with torch.no_grad():
        comp = _Compacted(x.T.to(device=device, dtype=f64), y.T.to(device=device, dtype=f64))
        cols, rows = _cells(fit)
        span = t_rows if fit.window == 0 or fit.window > t_rows else fit.window
        table = _lag_table(span, lags_opt, device) if kind == "hac" else None
        for a, b in _chunks(int(cols.numel()), span):
            c, r = cols[a:b], rows[a:b]
            batch = gather_windows(x, y, fit.window, c, r, _compact=comp)
            lags = table[batch.n] if table is not None else None
            cov = _sandwich(batch, kind, lags)
            store[:, c, r] = cov.T
            if lags is not None:
                lag_store[c, r] = lags
    if fit.window == 0:
        store = store.expand(-1, -1, t_rows)
        lag_store = lag_store.expand(-1, t_rows)
    cov_unique = store.permute(2, 1, 0)
    ses = [store[k].T.clamp(min=0.0).sqrt() for k in (0, 3, 5)]
    return CoefficientInference(
        se_type=kind,
        cov_unique=cov_unique,
        alpha_se=ses[0],
        beta_se=ses[1],
        gamma_se=ses[2],
        dof=fit.dof,
        use_t=False,
        hac_lags=lag_store.T if kind == "hac" else None,
    )


# --------------------------------------------------------------------------------------------
# Tests and criteria
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CoefficientTests:
    """The convexity (Treynor-Mazuy) test per row: ``gamma_t`` and its two-sided p-value."""

    gamma_t: Tensor
    gamma_p: Tensor


def coefficient_tests(fit: QuadraticFit, inference: CoefficientInference) -> CoefficientTests:
    """``gamma / gamma_se`` and its two-sided p-value under ``inference``'s convention."""
    with torch.no_grad():
        t = fit.gamma / inference.gamma_se
        p = student_t_two_sided_p(t, inference.dof) if inference.use_t else normal_two_sided_p(t)
    return CoefficientTests(gamma_t=t, gamma_p=p)


@dataclass(frozen=True, eq=False)
class InformationCriteria:
    """Gaussian AIC of the linear and quadratic fits of each window, and their difference."""

    aic_linear: Tensor
    aic_quadratic: Tensor
    #: ``aic_quadratic - aic_linear``; negative favours the curve.
    delta_aic: Tensor


def information_criteria(fit: QuadraticFit) -> InformationCriteria:
    """AICs as statsmodels' ``OLSResults.aic`` (Gaussian log-likelihood, ``k`` = 3 and 2)."""
    with torch.no_grad():
        n = fit.dof + 3.0
        t = fit.gamma / fit.gamma_se  # the classical t: the F-test of the linear restriction
        growth = torch.log1p(t * t / fit.dof)  # log(RSS_lin / RSS_quad)
        base = n * (math.log(2.0 * math.pi) + torch.log(fit.rss / n) + 1.0)
        aic_q = base + 6.0
        aic_l = base + n * growth + 4.0
        delta = 2.0 - n * growth
    return InformationCriteria(aic_linear=aic_l, aic_quadratic=aic_q, delta_aic=delta)


def normal_two_sided_p(z: Tensor) -> Tensor:
    """``P(|Z| > |z|)`` for a standard normal ``Z`` (NaN stays NaN)."""
    return torch.erfc(z.abs() * (1.0 / math.sqrt(2.0)))


def student_t_two_sided_p(t: Tensor, dof: Tensor) -> Tensor:
    """``P(|T| > |t|)`` for Student's t with ``dof`` degrees of freedom, elementwise.

    The regularized incomplete beta ``I_x(dof/2, 1/2)``, ``x = dof / (dof + t^2)``, by its
    continued fraction (modified Lentz), each tail in the form that keeps full relative
    precision.  NaN in ``t`` or ``dof`` (or ``dof <= 0``) gives NaN.  Large inputs on the CPU
    go in chunks of :data:`~sensitivity.threads.CHUNK_CELLS` cells on its threads; every
    element's arithmetic is its own, so the result is the same bits in any chunking.
    """
    t = t.to(torch.float64)
    nu = dof.to(torch.float64).expand_as(t) if dof.shape != t.shape else dof.to(torch.float64)
    n = t.numel()
    if n <= CHUNK_CELLS or t.device.type != "cpu":  # an accelerator takes the panel at once
        return _t_two_sided_p(t, nu)
    flat_t, flat_nu = t.reshape(-1), nu.reshape(-1)
    out = torch.empty(n, dtype=torch.float64, device=t.device)

    def one_chunk(start: int) -> None:
        stop = min(n, start + CHUNK_CELLS)
        out[start:stop] = _t_two_sided_p(flat_t[start:stop], flat_nu[start:stop])

    for_each_chunk(one_chunk, range(0, n, CHUNK_CELLS), t.device, "student-t-p")
    return out.reshape(t.shape)


def _t_two_sided_p(t: Tensor, nu: Tensor) -> Tensor:
    """:func:`student_t_two_sided_p` of float64 ``t`` and ``nu`` of the same shape."""
    bad = ~(torch.isfinite(nu) & (nu > 0)) | torch.isnan(t)
    nu = torch.where(bad, 1.0, nu)
    tt = torch.where(bad | torch.isinf(t), 0.0, t) ** 2
    a = nu * 0.5
    b = torch.full_like(a, 0.5)
    log_x = -torch.log1p(tt / nu)  # x = nu / (nu + t^2)
    log_1mx = torch.log(tt) - torch.log(nu + tt)  # 1 - x = t^2 / (nu + t^2)
    x = torch.exp(log_x)
    one_minus_x = tt / (nu + tt)
    # The continued fraction for I_x(a, b) converges fast for x < (a+1)/(a+b+2), that for
    # the complement I_(1-x)(b, a) beyond (Numerical Recipes' betai).  The direct form,
    # a product, keeps full relative precision; the complement, p = 1 - I, is used only
    # where p is large (x near 1: small |t|), so the subtraction loses nothing.
    direct = x < (a + 1.0) / (a + b + 2.0)
    aa = torch.where(direct, a, b)
    bb = torch.where(direct, b, a)
    xx = torch.where(direct, x, one_minus_x)
    log_front = _log_gamma_ratio_half(a) - 0.5 * math.log(math.pi) + a * log_x + b * log_1mx
    front = torch.exp(log_front)
    cf = _beta_continued_fraction(aa, bb, xx)
    p = torch.where(direct, front * cf / a, 1.0 - front * cf / b)
    p = torch.where(torch.isinf(t), 0.0, p.clamp(0.0, 1.0))
    return torch.where(bad, math.nan, p)


def _log_gamma_ratio_half(a: Tensor) -> Tensor:
    """``log(Gamma(a + 1/2) / Gamma(a))``; for ``a >= 50`` by its asymptotic series (no cancellation)."""
    big = a >= 50.0
    inv = 1.0 / torch.where(big, a, 1.0)
    inv2 = inv * inv
    series = 0.5 * torch.log(a) + inv * (
        -1.0 / 8.0 + inv2 * (1.0 / 192.0 + inv2 * (-1.0 / 640.0 + inv2 * (17.0 / 14336.0)))
    )
    return torch.where(big, series, torch.lgamma(a + 0.5) - torch.lgamma(a))


def _beta_continued_fraction(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """The continued fraction of the incomplete beta function (Numerical Recipes ``betacf``).

    Elementwise; each element iterates until its own step is within 1e-15 of 1 and is then
    frozen, so its value never depends on which other elements share the batch (the same
    inputs give the same bits in any batch).  Only elements still iterating are computed on:
    a frozen element is carried (unchanged) until a quarter of the batch has frozen, then the
    frozen ones are written out and the rest compacted (a few need hundreds of steps where
    most need twenty; compacting every step cost more in gathers than the steps themselves).
    """
    tiny = 1e-300
    shape = x.shape
    h = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
    a, b, x = a.reshape(-1), b.reshape(-1), x.reshape(-1)
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = torch.ones_like(x)
    d = _away_from_zero(1.0 - qab * x / qap, tiny).reciprocal_()
    value = d.clone()
    at = torch.arange(x.numel(), device=x.device)  # where each element's value goes in h
    live = torch.ones_like(x, dtype=torch.bool)
    for step_number in range(1, 10_001):
        if not at.numel():
            break
        m = float(step_number)  # a float: an int operand is converted to a tensor on every use
        m2 = 2.0 * m
        num = m * (b - m) * x / ((qam + m2) * (a + m2))
        dd = _away_from_zero(1.0 + num * d, tiny).reciprocal_()
        cc = _away_from_zero(1.0 + num / c, tiny)
        hh = value * dd * cc
        num = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        dd = _away_from_zero(1.0 + num * dd, tiny).reciprocal_()
        cc = _away_from_zero(1.0 + num / cc, tiny)
        step = dd * cc
        value = torch.where(live, hh * step, value)
        c = torch.where(live, cc, c)
        d = torch.where(live, dd, d)
        live &= (step - 1.0).abs() > 1e-15
        remaining = int(live.sum())
        if remaining <= 0.75 * live.numel():
            # One index of the live elements for every array (a boolean index per array
            # searched the mask again each time: most of the compaction's cost).
            keep = torch.nonzero(live).squeeze(1)
            done = torch.nonzero(~live).squeeze(1)
            h[at.index_select(0, done)] = value.index_select(0, done)
            at, a, b, x, qab, qap, qam, c, d, value = (
                v.index_select(0, keep) for v in (at, a, b, x, qab, qap, qam, c, d, value)
            )
            live = torch.ones_like(x, dtype=torch.bool)
    h[at] = value
    return h.reshape(shape)


def _away_from_zero(v: Tensor, tiny: float) -> Tensor:
    """``v`` with entries of magnitude below ``tiny`` set to ``tiny`` (Lentz's guard), in place."""
    return v.masked_fill_(v.abs() < tiny, tiny)
