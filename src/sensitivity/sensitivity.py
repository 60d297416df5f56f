"""Per-day market sensitivities of a fitted quadratic market model, by torch autograd.

For the fit of day ``t`` (``alpha_t, beta_t, gamma_t``) the fitted return is
``r_hat(r_m) = alpha_t + beta_t*r_m + gamma_t*r_m**2`` and the day's sensitivity is its slope at
that day's index return, ``d r_hat / d r_m`` at ``r_m = x_t``.  :func:`daily_sensitivity`
obtains it with ``torch.autograd.grad`` of the fitted model (never from a hand-written
derivative), and its gradient with respect to ``(alpha, beta, gamma)`` -- ``(0, 1, 2*x_t)`` --
by differentiating once more.  Both run on whole panels at once: the model is elementwise (each
day's fitted return depends only on that day's coefficients and index return), so the
gradient of the panel's sum is every cell's own derivative.

Standard errors use the delta method with a covariance ``Sigma`` of the coefficients -- by
default the fit's classical one, or a robust one (HC1, HAC: :mod:`sensitivity.inference`):
``se = sqrt(g' Sigma g)``.  The confidence interval is ``sensitivity -/+ q * se``.  With the
classical covariance ``q`` is the two-sided Student-t critical value at ``n_obs - 3`` degrees of
freedom, the distribution of ``(estimate - truth) / se`` for a linear function of OLS
coefficients under normal errors; with a robust covariance it is the standard normal quantile
(statsmodels' convention for robust covariances, whose justification is asymptotic).
:func:`student_t_quantile` computes the t quantile exactly (to rounding) without scipy.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sensitivity.buffers import OutputBuffers
from sensitivity.errors import ConfigError, DataValidationError
from sensitivity.model import QuadraticFit, default_chunk_size
from sensitivity.threads import for_each_chunk

if TYPE_CHECKING:
    from sensitivity.inference import CoefficientInference

__all__ = ["SensitivityResult", "daily_sensitivity", "fitted_return", "student_t_quantile"]

#: (row, column) of each entry of :attr:`QuadraticFit.cov_unique` (see ``COV_ENTRIES``).
_UNIQUE_PAIRS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))

#: Degrees of freedom above which the t quantile comes from the Cornish-Fisher expansion
#: (error below 1e-12 relative there, tested); at or below it, from Newton's method on the exact CDF.
_SERIES_MAX_DOF: int = 1000


@dataclass(frozen=True, eq=False)
class SensitivityResult:
    """Per-day sensitivities ``[T, N]`` (float64, NaN where the fit or the index return is missing)."""

    #: ``d r_hat / d r_m`` at the day's index return: ``beta + 2*gamma*r_m``.
    sensitivity: Tensor
    #: Delta-method standard error of the sensitivity.
    sensitivity_se: Tensor
    #: Lower bound of the two-sided ``level`` confidence interval.
    sensitivity_ci_lower: Tensor
    #: Upper bound of the two-sided ``level`` confidence interval.
    sensitivity_ci_upper: Tensor
    #: Confidence level of the interval.
    level: float


def fitted_return(alpha: Tensor, beta: Tensor, gamma: Tensor, r_m: Tensor) -> Tensor:
    """The fitted quadratic market model ``alpha + beta*r_m + gamma*r_m**2`` (elementwise).

    Evaluated in Horner's form, ``alpha + r_m*(beta + gamma*r_m)``: one multiplication fewer,
    and differentiating it twice (:func:`daily_sensitivity`) takes 12 elementwise operations
    on the panel instead of 16 (measured: the sensitivity step took 8% less time at 3,000 x
    7,500 on two threads, 14% on one thread at 300 x 7,500).
    """
    return alpha + r_m * (beta + gamma * r_m)


def _slope_and_gradient(
    alpha: Tensor, beta: Tensor, gamma: Tensor, r_m: Tensor
) -> tuple[tuple[Tensor | None, Tensor | None, Tensor | None], Tensor]:
    """``((d slope / d alpha, d slope / d beta, d slope / d gamma), slope)`` of every cell, where
    ``slope = d r_hat / d r_m`` of :func:`fitted_return`, by two passes of autograd.  A
    derivative the slope does not depend on at all (autograd: unused) is None.

    ``torch.autograd.grad`` rather than ``torch.func.grad``: the latter imports torch's
    compiler stack (``torch._dynamo``) on its first call, 1.5 to 1.9 s of every process that
    computes a sensitivity (measured), for the same derivatives.
    """
    # Autograd runs even when the caller is in inference mode or holds inference tensors
    # (those are copied: they cannot require gradients).
    with torch.inference_mode(False), torch.enable_grad():
        params = (_leaf(alpha), _leaf(beta), _leaf(gamma))
        at = _leaf(r_m)
        # The gradient of a sum is each cell's own derivative (the model is elementwise);
        # summing also spares autograd's shape check of explicit grad_outputs, whose first use
        # imports torch.fx's symbolic shapes (0.4 s).
        fitted = fitted_return(*params, at)
        (slope,) = torch.autograd.grad(fitted.sum(), at, create_graph=True)
        grads = torch.autograd.grad(slope.sum(), params, allow_unused=True)
    d_alpha, d_beta, d_gamma = (None if g is None else g.detach() for g in grads)
    return (d_alpha, d_beta, d_gamma), slope.detach()


def _leaf(v: Tensor) -> Tensor:
    """``v`` as a fresh autograd leaf (a copy only for an inference tensor)."""
    return (v.clone() if v.is_inference() else v.detach()).requires_grad_()


def daily_sensitivity(
    fit: QuadraticFit,
    x: Tensor,
    *,
    level: float = 0.95,
    inference: CoefficientInference | None = None,
    out: OutputBuffers | None = None,
) -> SensitivityResult:
    """Sensitivity of each day's fitted return to the index return, with its uncertainty.

    Parameters
    ----------
    fit
        The rolling fits (:func:`~sensitivity.model.quadratic_fit`).
    x
        ``[T, N]`` index returns the fit used (or any ``[T, N]`` evaluation points); NaN gives NaN.
    level
        Confidence level of the interval, in (0, 1).
    inference
        The covariance to use (:func:`sensitivity.inference.robust_covariance`); default the
        fit's classical covariance.
    out
        Storage to write the results into instead of fresh memory (its buffer
        ``"sensitivity"``; see :class:`~sensitivity.buffers.OutputBuffers`): the returned
        tensors are then views of it, overwritten by the next call with the same ``out``.

    Returns
    -------
    SensitivityResult
        ``sensitivity = beta + 2*gamma*x`` (by autograd), its delta-method standard error and
        the confidence interval: Student-t at ``n_obs - 3`` degrees of freedom for the
        classical covariance, standard normal for a robust one.

    Raises
    ------
    ConfigError
        For ``level`` outside (0, 1).
    DataValidationError
        For ``x`` not a tensor of the fit's shape, or ``out`` not an ``OutputBuffers``.
    """
    lvl = _check_level(level)
    if not isinstance(x, Tensor) or tuple(x.shape) != fit.shape:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise DataValidationError(f"x must be a tensor of the fit's shape {fit.shape}, got {got}")
    device = fit.beta.device
    x_dev = x.to(device=device, dtype=torch.float64)
    n_days, n_rows = fit.shape
    # Outputs ticker-major, the layout of the fit's storage; returned as [T, N] views.
    if out is None:
        sens, se, lower, upper = (
            torch.empty((n_rows, n_days), dtype=torch.float64, device=device) for _ in range(4)
        )
    elif isinstance(out, OutputBuffers):
        sens, se, lower, upper = out.take("sensitivity", (4, n_rows, n_days), torch.float64, device)
    else:
        raise DataValidationError(f"out must be an OutputBuffers or None, got {type(out).__name__}")
    if sens.numel() == 0:
        return SensitivityResult(sens.T, se.T, lower.T, upper.T, level=lvl)
    cov_unique = fit.cov_unique if inference is None else inference.cov_unique
    cov = cov_unique.permute(2, 1, 0)  # [6, N, T], the order of COV_ENTRIES
    alpha, beta, gamma, dof = fit.alpha.T, fit.beta.T, fit.gamma.T, fit.dof.T
    use_t = inference is None or inference.use_t
    crit = 0.5 + lvl / 2.0
    if use_t:
        # dof is n_obs - 3 (an integer) where the fit exists and NaN elsewhere.  n_obs never
        # exceeds a rolling window, so the table of every dof up to window - 3 serves every
        # row without a pass over the panel (a full-sample fit's largest dof is looked up).
        # Indexed by dof; NaN at 0, which stands for a missing fit.
        top = fit.window - 3 if fit.window > 0 else int(dof.nan_to_num(0.0).max().item())
        quantiles = _t_quantiles_upto(crit, max(top, 0), device)
    z = NormalDist().inv_cdf(crit)
    # Ticker chunks as the fit cuts them (about CHUNK_CELLS cells on the CPU, side by side on
    # its single-threaded workers; large ones on an accelerator): each cell's arithmetic is the
    # same in any chunk and on any thread, so the results are the same bits.
    step = default_chunk_size(n_days, device)
    local = threading.local()

    def chunk(a: int) -> None:
        b = min(n_rows, a + step)
        ws = getattr(local, "workspace", None)
        if ws is None:
            ws = local.workspace = _SensitivityWorkspace(min(step, n_rows), n_days, device)
        n = b - a
        r_m = ws.r_m[:n]
        r_m.copy_(x_dev[:, a:b].T)  # ticker-major, as the fit
        grads, s_ab = _slope_and_gradient(alpha[a:b], beta[a:b], gamma[a:b], r_m)
        with torch.no_grad():
            # Delta method: var = g' Sigma g with g = (0, 1, 2 r_m) from autograd; a gradient
            # autograd reports as unused (None: that of alpha) is zero, and so are its terms.
            # Into buffers reused from chunk to chunk: fresh ones cost more in page faults
            # than the arithmetic (as in the fit's workspace).
            var, product, half = ws.var[:n].zero_(), ws.product[:n], ws.half[:n]
            for k, (i, j) in enumerate(_UNIQUE_PAIRS):
                gi, gj = grads[i], grads[j]
                if gi is None or gj is None:
                    continue
                torch.mul(gi, gj, out=product)
                var.addcmul_(product, cov[k, a:b], value=1.0 if i == j else 2.0)
            se_ab = torch.sqrt(var.clamp_(min=0.0), out=se[a:b])
            if use_t:
                # The quantile of each cell's dof (0, a missing fit, looks up NaN).
                torch.nan_to_num(dof[a:b], nan=0.0, out=product)
                index = ws.index[:n]
                index.copy_(product)
                torch.index_select(quantiles, 0, index.view(-1), out=half.view(-1))
            else:
                half.fill_(z).masked_fill_(torch.isnan(dof[a:b]), math.nan)
            half.mul_(se_ab)
            sens[a:b] = s_ab
            torch.sub(s_ab, half, out=lower[a:b])
            torch.add(half, s_ab, out=upper[a:b])

    for_each_chunk(chunk, range(0, n_rows, step), device, "sensitivity")
    return SensitivityResult(
        sensitivity=sens.T,
        sensitivity_se=se.T,
        sensitivity_ci_lower=lower.T,
        sensitivity_ci_upper=upper.T,
        level=lvl,
    )


class _SensitivityWorkspace:
    """Buffers of one thread's chunks in :func:`daily_sensitivity`, reused from chunk to chunk."""

    def __init__(self, chunk: int, days: int, device: torch.device) -> None:
        f64 = torch.float64
        self.r_m = torch.empty((chunk, days), dtype=f64, device=device)
        self.var = torch.empty((chunk, days), dtype=f64, device=device)
        self.product = torch.empty((chunk, days), dtype=f64, device=device)
        self.half = torch.empty((chunk, days), dtype=f64, device=device)
        self.index = torch.empty((chunk, days), dtype=torch.int64, device=device)


def _check_level(level: object) -> float:
    if isinstance(level, bool) or not isinstance(level, int | float):
        raise ConfigError(f"level must be a number in (0, 1), got {level!r}")
    lvl = float(level)
    if not 0.0 < lvl < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    return lvl


def student_t_quantile(p: float, dof: Tensor) -> Tensor:
    """Quantile ``t_p`` of Student's t distribution for integer degrees of freedom, elementwise.

    ``dof`` holds positive integers (float or integer dtype); NaN gives NaN.  Accurate to
    about 1e-13 relative (tested against scipy to 1e-12): for ``dof <= 1000`` by Newton's
    method on the exact finite-series CDF of the t distribution with integer degrees of freedom
    (Abramowitz & Stegun 26.7.3-4), above by the Cornish-Fisher expansion to fourth order
    (A&S 26.7.5).

    Raises :class:`~sensitivity.errors.ConfigError` for ``p`` outside (0, 1) and
    :class:`~sensitivity.errors.DataValidationError` for a non-integer or non-positive ``dof``.
    """
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < float(p) < 1.0:
        raise ConfigError(f"p must be a probability in (0, 1), got {p!r}")
    d = dof.to(torch.float64)
    missing = torch.isnan(d)
    clean = d.masked_fill(missing, 1.0)
    bad = (clean < 1.0) | (torch.round(clean) != clean) | torch.isinf(clean)
    if bool(bad.any()):
        raise DataValidationError(f"dof must be positive integers (or NaN), got {clean[bad][0].item()}")
    if float(p) == 0.5:
        return torch.zeros_like(d).masked_fill_(missing, math.nan)
    return _t_quantile_of_integers(float(p), clean.to(torch.int64)).masked_fill_(missing, math.nan)


def _t_quantile_of_integers(p: float, idx: Tensor) -> Tensor:
    """:func:`student_t_quantile` for an int64 tensor of dof (0 stands for missing: NaN)."""
    return _t_quantile_table(p, idx)[idx]


@functools.lru_cache(maxsize=32)
def _t_quantiles_upto(p: float, top: int, device: torch.device) -> Tensor:
    """The quantile ``t_p`` of every dof from 0 to ``top``, indexed by dof (NaN at 0).

    Cached: a universe is fitted in many ticker groups, each asking for the same table (a few
    milliseconds of Newton steps each time).  Callers only read it.
    """
    with torch.inference_mode(False), torch.no_grad():
        return _t_quantile_table(p, torch.arange(top + 1, device=device))


def _t_quantile_table(p: float, idx: Tensor) -> Tensor:
    """The quantile of every dof in ``idx`` (int64, 0 for missing), indexed by dof (NaN at 0
    and at the dof that do not occur)."""
    present = torch.bincount(idx.reshape(-1))  # which dof occur, in O(n)
    present[0] = 0
    nus = torch.nonzero(present).squeeze(1)
    table = torch.full((present.shape[0],), math.nan, dtype=torch.float64, device=idx.device)
    if nus.numel():
        table[nus] = _two_sided_t(abs(2.0 * p - 1.0), nus.to(torch.float64))
    if p < 0.5:
        table.neg_()
    return table


def _two_sided_t(a: float, nu: Tensor) -> Tensor:
    """``t > 0`` with ``P(|T_nu| < t) = a`` for each integer ``nu`` (float64 tensor)."""
    z = NormalDist().inv_cdf(0.5 + a / 2.0)
    t = _cornish_fisher(z, nu)
    small = nu <= _SERIES_MAX_DOF
    if bool(small.any()):
        t[small] = _newton_t(a, z, nu[small])
    return t


def _cornish_fisher(z: float, nu: Tensor) -> Tensor:
    """Cornish-Fisher expansion of the t quantile in powers of ``1/nu`` (A&S 26.7.5)."""
    z2 = z * z
    g1 = z * (z2 + 1.0) / 4.0
    g2 = z * ((5.0 * z2 + 16.0) * z2 + 3.0) / 96.0
    g3 = z * (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) / 384.0
    g4 = z * ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) / 92160.0
    inv = 1.0 / nu
    return z + inv * (g1 + inv * (g2 + inv * (g3 + inv * g4)))


def _newton_t(a: float, z: float, nu: Tensor) -> Tensor:
    """Solve ``A(theta) = a`` by Newton's method in ``theta = atan(t / sqrt(nu))``.

    ``A(theta) = P(|T| < sqrt(nu) tan(theta))`` is the finite series of A&S 26.7.3-4 for integer
    ``nu``; ``A'(theta) = C_nu cos(theta)^(nu-1)`` is increasing-concave on (0, pi/2), so Newton
    from the normal quantile (always below the t quantile) rises monotonically to the root.
    """
    dt = nu.dtype
    odd = torch.remainder(nu, 2.0) == 1.0
    n_terms = torch.where(odd, (nu - 1.0) / 2.0, nu / 2.0)  # series terms k = 0 .. n_terms - 1
    k_max = int(n_terms.max().item())
    k = torch.arange(max(k_max, 1), dtype=dt, device=nu.device)
    lg = torch.lgamma
    log4 = math.log(4.0)
    # log of the series coefficients: even d_k = C(2k, k) / 4^k ; odd c_k = 4^k (k!)^2 / (2k+1)!
    log_even = lg(2.0 * k + 1.0) - 2.0 * lg(k + 1.0) - k * log4
    log_odd = k * log4 + 2.0 * lg(k + 1.0) - lg(2.0 * k + 2.0)
    log_coef = torch.where(odd[:, None], log_odd[None, :], log_even[None, :])
    used = k[None, :] < n_terms[:, None]
    log_c_nu = math.log(2.0) + lg((nu + 1.0) / 2.0) - 0.5 * math.log(math.pi) - lg(nu / 2.0)
    sqrt_nu = torch.sqrt(nu)
    theta = torch.atan(z / sqrt_nu)
    polished = False
    for _ in range(_NEWTON_MAX_STEPS):
        s, c = torch.sin(theta), torch.cos(theta)
        log_c2 = 2.0 * torch.log(c)
        terms = torch.where(used, torch.exp(log_coef + k[None, :] * log_c2[:, None]), 0.0)
        series = terms.sum(1)
        cdf = torch.where(odd, (2.0 / math.pi) * (theta + s * c * series), s * series)
        deriv = torch.exp(log_c_nu + (nu - 1.0) * torch.log(c))
        step = (cdf - a) / deriv
        theta = torch.clamp(theta - step, max=math.pi / 2.0 - 1e-300)
        if polished:
            break
        # Quadratic convergence: once every step is below 1e-10 of theta, the error left is
        # about the square of that, under the rounding of the series (~2e-14 relative, where
        # the steps only jitter and a tighter test would never pass): one more step and stop.
        polished = bool((step.abs() <= _NEWTON_TOL * theta).all())
    return sqrt_nu * torch.tan(theta)


#: Newton steps of :func:`_newton_t` at most (it takes about 7 from the normal quantile).
_NEWTON_MAX_STEPS: int = 60

#: Relative step after which :func:`_newton_t` takes one polishing step and stops.
_NEWTON_TOL: float = 1e-10
