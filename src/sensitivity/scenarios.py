"""What-if tables: the latest fit's predicted stock return and price move for given index moves.

For each summary row (a combination's latest fit) and each index move ``m`` (a decimal
fraction, ``-0.05`` = -5%), :func:`scenario_table` gives the fitted mean return

    ``predicted_return = rf + alpha + beta*(m - rf) + gamma*(m - rf)**2``

(``rf`` the row's ``risk_free_return``, 0 unless the model runs on excess returns), its
standard error by the delta method with gradient ``(1, m - rf, (m - rf)**2)`` and the row's
covariance of ``(alpha, beta, gamma)`` (the ``*_se`` and ``cov_*`` columns, or their ``huber_``
counterparts), the interval for the **mean** return ``predicted_return -/+ q*se`` (``q``:
Student-t at ``n_obs - 3`` degrees of freedom for the classical OLS covariance, the standard
normal for HC1, HAC and Huber's H1 -- statsmodels' conventions), and the price move
``close * predicted_return`` with its interval, in the stock's currency.  The interval covers
the expected return of such a day, not the return of one day (which adds the residual noise).

Pure: a summary frame in, a scenario frame out (see ``docs/schema.md``, ``reports/scenarios/``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
import torch

from sensitivity.errors import ConfigError, DataValidationError
from sensitivity.sensitivity import student_t_quantile

__all__ = ["DEFAULT_MOVES", "SCENARIO_FRAME_COLUMNS", "scenario_table"]

#: The default index moves: -10%, -5%, -2%, -1%, +1%, +2%, +5%, +10%.
DEFAULT_MOVES: tuple[float, ...] = (-0.10, -0.05, -0.02, -0.01, 0.01, 0.02, 0.05, 0.10)

#: Columns of :func:`scenario_table`'s result, in order.
SCENARIO_FRAME_COLUMNS: tuple[str, ...] = (
    "as_of",
    "index_ticker",
    "ticker",
    "window",
    "date",
    "n_obs",
    "fit",
    "se_type",
    "level",
    "index_move",
    "risk_free_return",
    "predicted_return",
    "predicted_return_se",
    "predicted_return_ci_lower",
    "predicted_return_ci_upper",
    "close",
    "price_move",
    "price_move_ci_lower",
    "price_move_ci_upper",
)

_NEEDED = (
    "as_of",
    "index_ticker",
    "ticker",
    "window",
    "date",
    "n_obs",
    "se_type",
    "close",
    "risk_free_return",
)
_COEF = (
    "alpha",
    "beta",
    "gamma",
    "alpha_se",
    "beta_se",
    "gamma_se",
    "cov_alpha_beta",
    "cov_alpha_gamma",
    "cov_beta_gamma",
)


def scenario_table(
    summary: pd.DataFrame,
    moves: Sequence[float] = DEFAULT_MOVES,
    *,
    fit: str = "ols",
    level: float = 0.95,
) -> pd.DataFrame:
    """One row per (summary row, index move): the latest fit's predicted return and price move.

    Parameters
    ----------
    summary
        Summary rows (``reports/summary/``): ``as_of``, the keys, ``date``, ``n_obs``,
        ``se_type``, ``close``, ``risk_free_return`` and the coefficients, standard errors and
        covariances of the chosen fit.
    moves
        Index moves as decimal fractions, each in (-1, 1].
    fit
        ``"ols"`` (the ``alpha`` ... ``cov_beta_gamma`` columns) or ``"huber"`` (their
        ``huber_`` counterparts; covariance H1).
    level
        Confidence level of the intervals, in (0, 1).

    Returns
    -------
    pandas.DataFrame
        The columns of :data:`SCENARIO_FRAME_COLUMNS`, rows ordered as ``summary`` then
        ``moves``.  Values are NaN where the row has no fit.
    """
    if fit not in ("ols", "huber"):
        raise ConfigError(f"fit must be 'ols' or 'huber', got {fit!r}")
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0.0 < float(level) < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level!r}")
    m = np.asarray([float(v) for v in moves], dtype=np.float64)
    if m.size == 0 or not np.all((m > -1.0) & (m <= 1.0)):
        raise ConfigError(f"moves must be index moves in (-1, 1] (decimal fractions), got {list(moves)!r}")
    prefix = "" if fit == "ols" else "huber_"
    needed = [*_NEEDED, *(prefix + c for c in _COEF)]
    absent = [c for c in needed if c not in summary.columns]
    if absent:
        raise DataValidationError(f"summary lacks column(s) {', '.join(absent)} needed for the scenarios")

    def col(name: str) -> np.ndarray[Any, Any]:
        return np.asarray(summary[name].to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)

    a, b, g = (col(prefix + c)[:, None] for c in ("alpha", "beta", "gamma"))
    vaa, vbb, vgg = (col(prefix + c)[:, None] ** 2 for c in ("alpha_se", "beta_se", "gamma_se"))
    cab, cag, cbg = (
        col(prefix + c)[:, None] for c in ("cov_alpha_beta", "cov_alpha_gamma", "cov_beta_gamma")
    )
    rf = col("risk_free_return")[:, None]
    close = col("close")[:, None]
    n_obs = summary["n_obs"].to_numpy(dtype=np.int64)
    u = m[None, :] - rf
    u2 = u * u
    pred = rf + a + b * u + g * u2
    var = vaa + vbb * u2 + vgg * u2 * u2 + 2.0 * (cab * u + cag * u2 + cbg * u * u2)
    se = np.sqrt(np.maximum(var, 0.0))
    se_type = summary["se_type"].astype(str).to_numpy() if fit == "ols" else np.full(len(summary), "h1")
    q = _quantiles(se_type, n_obs, float(level))[:, None]
    lower, upper = pred - q * se, pred + q * se

    rows, k = len(summary), m.size

    def rep(values: Any) -> np.ndarray[Any, Any]:
        return np.repeat(np.asarray(values), k)

    out = pd.DataFrame(
        {
            "as_of": rep(summary["as_of"].to_numpy()),
            "index_ticker": pd.Series(rep(summary["index_ticker"].astype(str).to_numpy()), dtype="str"),
            "ticker": pd.Series(rep(summary["ticker"].astype(str).to_numpy()), dtype="str"),
            "window": rep(summary["window"].to_numpy(dtype=np.int64)),
            "date": rep(summary["date"].to_numpy()),
            "n_obs": rep(n_obs),
            "fit": pd.Series(np.full(rows * k, fit), dtype="str"),
            "se_type": pd.Series(rep(se_type), dtype="str"),
            "level": np.full(rows * k, float(level)),
            "index_move": np.tile(m, rows),
            "risk_free_return": np.broadcast_to(rf, (rows, k)).reshape(-1),
            "predicted_return": pred.reshape(-1),
            "predicted_return_se": se.reshape(-1),
            "predicted_return_ci_lower": lower.reshape(-1),
            "predicted_return_ci_upper": upper.reshape(-1),
            "close": np.broadcast_to(close, (rows, k)).reshape(-1),
            "price_move": (close * pred).reshape(-1),
            "price_move_ci_lower": (close * lower).reshape(-1),
            "price_move_ci_upper": (close * upper).reshape(-1),
        }
    )
    return out.loc[:, list(SCENARIO_FRAME_COLUMNS)]


def _quantiles(
    se_type: np.ndarray[Any, Any], n_obs: np.ndarray[Any, Any], level: float
) -> np.ndarray[Any, Any]:
    """Two-sided ``level`` quantile per row: Student-t at ``n_obs - 3`` for classical, else normal."""
    p = 0.5 + level / 2.0
    z = NormalDist().inv_cdf(p)
    out = np.full(se_type.shape, z, dtype=np.float64)
    classical = se_type == "classical"
    if classical.any():
        dof = n_obs[classical].astype(np.float64) - 3.0
        dof = np.where(dof >= 1.0, dof, math.nan)
        out[classical] = student_t_quantile(p, torch.from_numpy(dof)).numpy()
    return out
