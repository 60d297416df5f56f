"""The batched Huber IRLS fit against statsmodels ``RLM(y, X, M=HuberT()).fit()``.

The oracle refits each window with statsmodels' defaults (MAD scale, H1 covariance, deviance
convergence at 1e-8, at most 50 iterations); the batched fit replays the same iterations, so
parameters, scale, covariance and even the iteration count agree.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import statsmodels.api as sm
import torch

from sensitivity.inference import _cells, gather_windows
from sensitivity.model import quadratic_fit
from sensitivity.robust import HUBER_T, MAD_NORMALISATION, _mad, huber_rolling, huber_windows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_inference import needs_sample, sample_panel
from test_model import synthetic_panel, window_rows

RTOL = 1e-8
_FULL = ((0, 1, 2), (1, 3, 4), (2, 4, 5))


def with_outliers(seed: int = 21, t_rows: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic panel with gaps plus earnings-day jumps (3% of days, 8% moves)."""
    x, y = synthetic_panel(seed=seed, t_rows=t_rows)
    rng = np.random.default_rng(seed + 1)
    y = y + np.where(rng.random(y.shape) < 0.03, rng.normal(0.0, 0.08, y.shape), 0.0)
    return x, y


def rlm(xs: np.ndarray, ys: np.ndarray):
    design = np.column_stack([np.ones(xs.size), xs, xs * xs])
    return sm.RLM(ys, design, M=sm.robust.norms.HuberT()).fit()


def check_against_rlm(alpha, beta, gamma, cov, res, where: str) -> None:
    ours = np.array([alpha, beta, gamma])
    tol = RTOL * np.maximum(np.abs(res.params), res.bse)
    assert np.all(np.abs(ours - res.params) <= tol), f"params at {where}: {ours} vs {res.params}"
    expected = res.cov_params()
    scale = np.sqrt(np.outer(np.diag(expected), np.diag(expected)))
    assert np.all(np.abs(cov - expected) <= RTOL * scale), f"cov at {where}"


@pytest.mark.parametrize(("window", "min_obs"), [(40, 20), (0, 20)], ids=["rolling-40", "full-sample"])
def test_huber_rolling_matches_rlm_on_every_window(window, min_obs):
    """Every window of the gappy, late-listed and suspended columns (the whole panel is fitted)."""
    x, y = with_outliers(t_rows=150)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    fit = quadratic_fit(xt, yt, window=window, min_obs=min_obs)
    alpha, beta, gamma, cov_u = huber_rolling(xt, yt, fit)
    cov = cov_u[..., torch.tensor(_FULL)].numpy()
    t_rows, n = x.shape
    checked = 0
    for i in (1, 2, 4) if window else range(n):
        for t in range(t_rows) if window else (0, t_rows - 1):
            if not bool(fit.valid[t, i]):
                assert math.isnan(beta[t, i].item())
                continue
            rows = window_rows(t, window, t_rows)
            ok = np.isfinite(x[rows, i]) & np.isfinite(y[rows, i])
            res = rlm(x[rows, i][ok], y[rows, i][ok])
            check_against_rlm(
                alpha[t, i].item(), beta[t, i].item(), gamma[t, i].item(), cov[t, i], res, f"{t},{i}"
            )
            checked += 1
    assert checked > (250 if window else 9)


def test_huber_windows_replays_statsmodels_iterations_and_scale():
    x, y = with_outliers(seed=5, t_rows=150)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    fit = quadratic_fit(xt, yt, window=60, min_obs=30)
    cols, rows = _cells(fit)
    batch = gather_windows(xt, yt, 60, cols, rows)
    h = huber_windows(batch)
    for m in range(0, int(cols.numel()), 17):
        i, t = int(cols[m]), int(rows[m])
        sl = window_rows(t, 60, x.shape[0])
        ok = np.isfinite(x[sl, i]) & np.isfinite(y[sl, i])
        res = rlm(x[sl, i][ok], y[sl, i][ok])
        assert int(h.iterations[m]) == res.fit_history["iteration"]
        assert h.scale[m].item() == pytest.approx(res.scale, rel=RTOL)
        np.testing.assert_allclose(
            [h.alpha_se[m].item(), h.beta_se[m].item(), h.gamma_se[m].item()], res.bse, rtol=RTOL
        )
        assert int(h.n[m]) == res.nobs


def test_huber_rolling_on_chosen_rows_only():
    x, y = with_outliers(seed=8, t_rows=120)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    fit = quadratic_fit(xt, yt, window=50, min_obs=25)
    last = torch.tensor([119, 100, -1, 90, 119])
    _, beta, _, _ = huber_rolling(xt, yt, fit, rows=last)
    everywhere = huber_rolling(xt, yt, fit)[1]
    for i, r in enumerate(last.tolist()):
        fitted = torch.isfinite(beta[:, i]).nonzero().squeeze(1).tolist()
        assert fitted == ([r] if r >= 0 and bool(fit.valid[r, i]) else [])
        if fitted:
            assert beta[r, i].item() == everywhere[r, i].item()


@needs_sample
def test_huber_on_bundled_sample_latest_windows_and_full_sample():
    tickers = ("AAPL", "JPM", "XOM", "KO")
    x, y = sample_panel(tickers, "2009-01-01", "2019-02-22", drop_seed=7)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    t_rows = x.shape[0]
    for window in (252, 0):
        fit = quadratic_fit(xt, yt, window=window, min_obs=126)
        last = torch.full((len(tickers),), t_rows - 1)
        alpha, beta, gamma, cov_u = huber_rolling(xt, yt, fit, rows=last)
        cov = cov_u[..., torch.tensor(_FULL)].numpy()
        for i in range(len(tickers)):
            rows = window_rows(t_rows - 1, window, t_rows)
            ok = np.isfinite(x[rows, i]) & np.isfinite(y[rows, i])
            res = rlm(x[rows, i][ok], y[rows, i][ok])
            t = t_rows - 1
            check_against_rlm(
                alpha[t, i].item(), beta[t, i].item(), gamma[t, i].item(), cov[t, i], res, tickers[i]
            )


@pytest.mark.parametrize("span", [1, 2, 5, 6, 40, 41])
def test_mad_is_numpys_median_for_any_number_of_valid_slots(span):
    rng = np.random.default_rng(span)
    rows = []
    for n in range(1, span + 1):
        e = np.zeros(span)
        e[span - n :] = rng.normal(size=n)
        rows.append(e)
    e = torch.from_numpy(np.array(rows))
    n = torch.arange(1, span + 1)
    mask = torch.arange(span)[None, :] >= (span - n)[:, None]
    got = _mad(e, mask, n).numpy()
    expected = [np.median(np.abs(r[span - k :]) / MAD_NORMALISATION) for k, r in enumerate(rows, start=1)]
    np.testing.assert_array_equal(got, expected)


def test_huber_of_a_window_with_zero_scale_is_nan():
    """All residuals 0 (MAD scale 0): statsmodels warns and stops; the batched fit reports NaN."""
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 0.01, (30, 2))
    y = np.zeros((30, 2))
    y[:, 1] = rng.normal(0.0, 0.01, 30)  # a normal column next to it is unaffected
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    fit = quadratic_fit(xt, yt, window=0, min_obs=10)
    _, beta, _, cov = huber_rolling(xt, yt, fit)
    assert torch.isnan(beta[:, 0]).all()
    assert torch.isnan(cov[:, 0]).all()
    assert torch.isfinite(beta[:, 1]).all()
    assert HUBER_T == 1.345
