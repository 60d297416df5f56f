"""A Huber-loss fit of the quadratic market model, batched over tickers and windows in torch.

One large return (an earnings day, a takeover rumour) can swing an OLS gamma.  The Huber
M-estimator down-weights observations whose standardised residual exceeds ``t = 1.345``.
:func:`huber_windows` fits it by iteratively reweighted least squares (IRLS) on a batch of
windows at once and reproduces statsmodels'
``RLM(y, X, M=sm.robust.norms.HuberT()).fit()`` step for step (its defaults: OLS start, MAD
scale ``median(|e|) / Phi^-1(3/4)`` re-estimated after every step, at most 50 iterations,
stopping when the M-deviance changes by less than ``1e-8``), so that a window's parameters,
scale and ``H1`` covariance equal statsmodels' to rounding:

* weights ``w_i = min(1, t / |e_i / scale|)``; each step a weighted least-squares fit;
* the deviance of a step is ``sum rho(e_i / s_w)`` with ``rho`` Huber's loss and
  ``s_w = sum w_i e_i^2 / (n - 3)`` (statsmodels' definition, kept for identical stopping);
* covariance ``H1``: ``K^2 * (sum psi(r_i)^2 / (n - 3)) * scale^2 / (mean psi'(r_i))^2 *
  (X'X)^-1`` with ``r = e / scale`` and ``K = 1 + (3 / n) * var(psi') / mean(psi')^2``
  (Huber 1981, as statsmodels' ``RLMResults.bcov_scaled``).

Every window is fitted in its own centred, standardised basis (see
:mod:`sensitivity.inference`); the results are mapped back to ``(alpha, beta, gamma)``.  A
window whose MAD scale is 0 (a perfect fit of more than half the points) has no Huber fit
(NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sensitivity.inference import (
    WindowBatch,
    _basis,
    _cells,
    _chunks,
    _Compacted,
    _solve,
    _to_raw_cov,
    gather_windows,
)
from sensitivity.model import QuadraticFit

__all__ = ["HUBER_T", "MAD_NORMALISATION", "HuberFit", "huber_cells", "huber_rolling", "huber_windows"]

#: Huber's tuning constant (95% efficiency at the normal), statsmodels' ``HuberT`` default.
HUBER_T: float = 1.345
#: ``Phi^-1(3/4)``: MAD / this estimates the standard deviation of normal errors.
MAD_NORMALISATION: float = 0.6744897501960817
#: statsmodels ``RLM.fit`` defaults.
_MAXITER: int = 50
_TOL: float = 1e-8


@dataclass(frozen=True, eq=False)
class HuberFit:
    """Huber fits of ``M`` windows (``[M]`` tensors; NaN where there is no fit)."""

    alpha: Tensor
    beta: Tensor
    gamma: Tensor
    #: ``[M, 6]`` unique entries of the H1 covariance (order of ``COV_ENTRIES``).
    cov_unique: Tensor
    #: The final MAD scale of the residuals.
    scale: Tensor
    #: IRLS iterations counted as statsmodels counts them (``fit_history["iteration"]``).
    iterations: Tensor
    #: Number of observations.
    n: Tensor

    @property
    def alpha_se(self) -> Tensor:
        """Standard error of alpha."""
        return self.cov_unique[:, 0].clamp(min=0.0).sqrt()

    @property
    def beta_se(self) -> Tensor:
        """Standard error of beta."""
        return self.cov_unique[:, 3].clamp(min=0.0).sqrt()

    @property
    def gamma_se(self) -> Tensor:
        """Standard error of gamma."""
        return self.cov_unique[:, 5].clamp(min=0.0).sqrt()


def _mad(e: Tensor, mask: Tensor, n: Tensor) -> Tensor:
    """``median(|e| / c)`` over the valid slots (the mean of the two middle values when n is even).

    The ``L - n`` empty slots are filled half below every value (-1) and half above (+inf).
    That puts the valid values' middle pair at ranks ``K - 2`` and ``K - 1`` of every row
    (``K - 1`` the largest upper-middle rank), so one partial selection (``topk``) serves
    windows of any ``n``.
    """
    span = e.shape[1]
    slot = torch.arange(span, device=e.device)
    low_pads = (span - n) // 2
    # Empty slots are the first L - n; the first low_pads of them go low, the rest high.
    low = torch.tensor(-1.0, dtype=e.dtype, device=e.device)
    pad = torch.where(slot[None, :] < low_pads[:, None], low, math.inf)
    a = torch.where(mask, e.abs() / MAD_NORMALISATION, pad)
    lo = low_pads + (n - 1) // 2
    hi = low_pads + n // 2
    k = int(hi.max().item()) + 1 if hi.numel() else 1
    if k < 2:  # a single observation
        return a[:, 0] if span == 1 else a.gather(1, hi[:, None]).squeeze(1)
    smallest = torch.topk(a, k, dim=1, largest=False, sorted=False).values
    top2 = torch.topk(smallest, 2, dim=1, largest=True, sorted=True).values  # ranks k-1, k-2
    pick_hi = torch.where(hi == k - 1, top2[:, 0], top2[:, 1])
    pick_lo = torch.where(lo == k - 1, top2[:, 0], top2[:, 1])
    return (pick_lo + pick_hi) * 0.5


def _weighted_step(u: Tensor, q: Tensor, y: Tensor, w: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted least squares of ``y`` on ``(1, u, q)`` per row: ``(theta [M, 3], residuals [M, L])``."""
    wu, wq = w * u, w * q
    s0, s1, s2 = w.sum(1), wu.sum(1), wq.sum(1)
    s3, s4 = (wq * u).sum(1), (wq * q).sum(1)
    gram = torch.stack(
        (torch.stack((s0, s1, s2), -1), torch.stack((s1, s2, s3), -1), torch.stack((s2, s3, s4), -1)), -2
    )
    rhs = torch.stack(((w * y).sum(1), (wu * y).sum(1), (wq * y).sum(1)), -1)
    theta = torch.linalg.solve(gram, rhs)
    e = y - theta[:, 0:1] - theta[:, 1:2] * u - theta[:, 2:3] * q
    return theta, torch.where(mask, e, 0.0)


def _rho(z: Tensor) -> Tensor:
    a = z.abs()
    return torch.where(a <= HUBER_T, 0.5 * z * z, a * HUBER_T - 0.5 * HUBER_T * HUBER_T)


def _deviance(e: Tensor, w: Tensor, mask: Tensor, dof: Tensor) -> Tensor:
    s_w = (w * e * e).sum(1) / dof
    return torch.where(mask, _rho(e / s_w[:, None]), 0.0).sum(1)


def huber_windows(batch: WindowBatch) -> HuberFit:
    """Huber IRLS fits of every window of ``batch`` (see the module docstring).

    Windows with fewer than 4 observations get NaN.
    """
    with torch.no_grad():
        mask = batch.mask
        m = mask.to(torch.float64)
        nf = batch.n.to(torch.float64)
        dof = nf - 3.0
        basis = _basis(batch)
        y = batch.y
        theta, e = _solve(basis, y)
        scale = _mad(e, mask, batch.n)
        current = _deviance(e, m, mask, dof)
        iterations = torch.ones_like(batch.n)
        active = torch.nonzero(scale != 0.0).squeeze(1)  # windows still iterating
        u_all, q_all = basis.u, basis.u2
        iteration = 1
        while active.numel():
            # One IRLS step on the active windows only.
            ma, ya = mask[active], y[active]
            r = e[active] / scale[active, None]
            a = r.abs()
            w = torch.where(a <= HUBER_T, 1.0, HUBER_T / torch.where(a > 0, a, 1.0)) * m[active]
            new_theta, new_e = _weighted_step(u_all[active], q_all[active], ya, w, ma)
            new_scale = _mad(new_e, ma, batch.n[active])
            new_dev = _deviance(new_e, w, ma, dof[active])
            theta[active] = new_theta
            e[active] = new_e
            scale[active] = new_scale
            old_dev = current[active]
            current[active] = new_dev
            iteration += 1
            iterations[active] = iteration
            # statsmodels: stop unless |dev_k - dev_{k-1}| > tol and k < maxiter (NaN stops);
            # a zero scale stops before the next step.
            keep = ((new_dev - old_dev).abs() > _TOL) & (iteration < _MAXITER) & (new_scale != 0.0)
            active = active[keep]
        ok = (batch.n >= 4) & (scale > 0) & torch.isfinite(scale)
        # H1 covariance.
        sr = e / torch.where(ok, scale, 1.0)[:, None]
        inside = (sr.abs() <= HUBER_T) & mask
        psi_d = inside.to(torch.float64)
        mean_d = psi_d.sum(1) / nf
        var_d = ((psi_d - mean_d[:, None]) ** 2 * m).sum(1) / nf
        k = 1.0 + 3.0 / nf * var_d / (mean_d * mean_d)
        psi = torch.where(inside, sr, HUBER_T * torch.sign(sr)) * m
        ss_psi = (psi * psi).sum(1)
        factor = k * k * (ss_psi / dof) * scale * scale / (mean_d * mean_d)
        cov_z = basis.gram_inv * factor[:, None, None]
        cov = _to_raw_cov(basis, cov_z)
        raw = (basis.back @ theta[..., None]).squeeze(-1)
        nan = torch.tensor(math.nan, dtype=torch.float64, device=raw.device)
        raw = torch.where(ok[:, None], raw, nan)
        cov = torch.where(ok[:, None], cov, nan)
        return HuberFit(
            alpha=raw[:, 0],
            beta=raw[:, 1],
            gamma=raw[:, 2],
            cov_unique=cov,
            scale=torch.where(ok, scale, nan),
            iterations=iterations,
            n=batch.n,
        )


def huber_rolling(
    x: Tensor, y: Tensor, fit: QuadraticFit, *, rows: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Huber fits of ``fit``'s windows: on every fitted row, or only on ``rows``.

    ``x``, ``y``: the ``[T, N]`` panels of ``fit``.  ``rows`` (int64 ``[N]``, -1 for none)
    picks one row per column (e.g. each ticker's latest); None fits every row that has an OLS
    fit (``window == 0``: the one full-sample fit per column).  Returns ``(alpha, beta, gamma,
    cov_unique)`` as ``[T, N]`` (``[T, N, 6]``) tensors, NaN where nothing was fitted.
    """
    t_rows, n_cols = fit.shape
    device = fit.beta.device
    with torch.no_grad():
        cols, cell_rows = _cells(fit)
        if rows is not None and fit.window != 0:
            want = rows.to(device)
            pick = want[cols] == cell_rows
            cols, cell_rows = cols[pick], cell_rows[pick]
        values = huber_cells(x, y, fit, cols, cell_rows)
        out_rows = 1 if fit.window == 0 else t_rows
        store = torch.full((9, n_cols, out_rows), math.nan, dtype=torch.float64, device=device)
        store[:, cols, cell_rows] = values
    if fit.window == 0:
        store = store.expand(-1, -1, t_rows)
    return store[0].T, store[1].T, store[2].T, store[3:].permute(2, 1, 0)


def huber_cells(x: Tensor, y: Tensor, fit: QuadraticFit, cols: Tensor, rows: Tensor) -> Tensor:
    """Huber fits of the windows of ``fit`` ending at the given cells, compactly.

    ``cols``, ``rows``: int64 ``[M]`` cells (column, row) where ``fit`` has a fit (for
    ``window == 0``, row 0 of each column).  Returns ``[9, M]``: ``alpha``, ``beta``,
    ``gamma`` and the six unique covariance entries (:data:`~sensitivity.model.COV_ENTRIES`),
    NaN where the Huber fit does not exist.  The windows are gathered a chunk at a time, so
    memory follows ``M``, not the panel.
    """
    t_rows, _ = fit.shape
    device = fit.beta.device
    f64 = torch.float64
    with torch.no_grad():
        cols, rows = cols.to(device), rows.to(device)
        out = torch.full((9, int(cols.numel())), math.nan, dtype=f64, device=device)
        comp = _Compacted(x.T.to(device=device, dtype=f64), y.T.to(device=device, dtype=f64))
        span = t_rows if fit.window == 0 or fit.window > t_rows else fit.window
        for a, b in _chunks(int(cols.numel()), span):
            h = huber_windows(gather_windows(x, y, fit.window, cols[a:b], rows[a:b], _compact=comp))
            out[0, a:b] = h.alpha
            out[1, a:b] = h.beta
            out[2, a:b] = h.gamma
            out[3:, a:b] = h.cov_unique.T
    return out
