"""Robust covariances, the convexity test and the AIC comparison against independent oracles.

Oracles: statsmodels ``OLS(y_w, X_w).fit(cov_type="HC1")`` / ``.fit(cov_type="HAC",
cov_kwds={"maxlags": L})`` refitted on the valid rows of **every** window (statsmodels drops
missing rows before it fits, so HAC lags count the window's valid observations),
``OLSResults.tvalues`` / ``pvalues`` / ``aic``, and ``scipy.stats`` for the p-values.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import mpmath
import numpy as np
import pytest
import statsmodels.api as sm
import torch
from scipy import stats

from sensitivity.errors import ConfigError, DataValidationError
from sensitivity.inference import (
    classical_inference,
    coefficient_tests,
    gather_windows,
    information_criteria,
    newey_west_lags,
    normal_two_sided_p,
    robust_covariance,
    student_t_two_sided_p,
)
from sensitivity.model import QuadraticFit, quadratic_fit
from sensitivity.returns import aligned_returns
from sensitivity.store import read_price_file
from sensitivity.threads import CHUNK_CELLS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_model import synthetic_panel, window_rows

RTOL = 1e-8
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
_FULL = ((0, 1, 2), (1, 3, 4), (2, 4, 5))


def window_data(x: np.ndarray, y: np.ndarray, t: int, i: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    rows = window_rows(t, window, x.shape[0])
    xs, ys = x[rows, i], y[rows, i]
    ok = np.isfinite(xs) & np.isfinite(ys)
    return xs[ok], ys[ok]


def sm_fit(xs: np.ndarray, ys: np.ndarray, se: str, lags: int | None):
    design = np.column_stack([np.ones(xs.size), xs, xs * xs])
    if se == "classical":
        return sm.OLS(ys, design).fit()
    if se == "hc1":
        return sm.OLS(ys, design).fit(cov_type="HC1")
    maxlags = newey_west_lags(xs.size) if lags is None else lags
    return sm.OLS(ys, design).fit(cov_type="HAC", cov_kwds={"maxlags": maxlags})


def worst_cov_error(x, y, fit: QuadraticFit, se: str, lags: int | None, rows=None) -> tuple[float, int]:
    """Largest ``|ours - statsmodels| / sqrt(v_ii v_jj)`` over every fitted window (and the count)."""
    inf = robust_covariance(torch.from_numpy(x), torch.from_numpy(y), fit, se=se, hac_lags=lags)
    cov = inf.covariance.numpy()
    t_rows, n = x.shape
    worst, count = 0.0, 0
    for i in range(n):
        for t in rows if rows is not None else range(t_rows):
            if not bool(fit.valid[t, i]):
                assert np.isnan(cov[t, i]).all()
                continue
            xs, ys = window_data(x, y, t, i, fit.window)
            expected = sm_fit(xs, ys, se, lags).cov_params()
            scale = np.sqrt(np.outer(np.diag(expected), np.diag(expected)))
            worst = max(worst, float(np.max(np.abs(cov[t, i] - expected) / scale)))
            ses = (inf.alpha_se[t, i].item(), inf.beta_se[t, i].item(), inf.gamma_se[t, i].item())
            np.testing.assert_allclose(ses, np.sqrt(np.diag(expected)), rtol=RTOL)
            count += 1
    return worst, count


@pytest.fixture(scope="module")
def panel() -> tuple[np.ndarray, np.ndarray]:
    return synthetic_panel(seed=11, t_rows=240)


@pytest.mark.parametrize(
    ("window", "min_obs", "se", "lags"),
    [
        (45, 20, "hc1", None),
        (45, 20, "hac", None),
        (45, 20, "hac", 7),
        (5, 4, "hc1", None),
        (5, 4, "hac", None),
        (1000, 20, "hac", 3),
        (0, 20, "hc1", None),
        (0, 20, "hac", None),
        (0, 20, "hac", 0),
    ],
    ids=[
        "rolling-45-hc1",
        "rolling-45-hac-nw",
        "rolling-45-hac-7",
        "rolling-5-hc1",
        "rolling-5-hac-nw",
        "window-beyond-T-hac-3",
        "full-sample-hc1",
        "full-sample-hac-nw",
        "full-sample-hac-0",
    ],
)
def test_robust_covariance_matches_statsmodels_on_every_window(panel, window, min_obs, se, lags):
    """Synthetic data with gaps, a late listing, a delisting and a suspension; T = 240."""
    x, y = panel
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=window, min_obs=min_obs)
    rows = (0, x.shape[0] // 2, x.shape[0] - 1) if window == 0 else None
    worst, count = worst_cov_error(x, y, fit, se, lags, rows)
    assert count > (10 if window == 0 else 500)
    assert worst < RTOL, worst


def sample_panel(tickers: tuple[str, ...], start: str, end: str, drop_seed: int | None = None):
    """Aligned returns of the bundled sample; ``drop_seed`` removes 8% of the last ticker's days."""
    index = read_price_file(SAMPLE / "^GSPC.parquet", start=start, end=end)
    frames = {t: read_price_file(SAMPLE / f"{t}.parquet", start=start, end=end) for t in tickers}
    if drop_seed is not None:
        last = tickers[-1]
        rng = np.random.default_rng(drop_seed)
        frames[last] = frames[last][rng.random(len(frames[last])) > 0.08]
    aligned = aligned_returns(index, frames)
    x = aligned.index_returns.to_numpy(dtype=np.float64)
    y = aligned.stock_returns.to_numpy(dtype=np.float64)
    # Copies: pandas hands out read-only views, which torch.from_numpy warns about.
    return np.array(x, order="C"), np.array(y, order="C")


needs_sample = pytest.mark.skipif(
    not (SAMPLE / "^GSPC.parquet").exists(), reason="the bundled sample data/sample/ is not present"
)


@needs_sample
@pytest.mark.parametrize(
    ("se", "lags"), [("hc1", None), ("hac", None), ("hac", 10)], ids=["hc1", "hac-nw", "hac-10"]
)
def test_robust_covariance_on_bundled_sample_every_window(se, lags):
    """Real prices (AAPL, and XOM with 8% of its days removed: gaps), every 252-day window of 2017-19."""
    x, y = sample_panel(("AAPL", "XOM"), "2016-09-01", "2019-02-22", drop_seed=3)
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=252, min_obs=126)
    worst, count = worst_cov_error(x, y, fit, se, lags)
    assert count > 2 * 300
    assert worst < RTOL, worst


@needs_sample
@pytest.mark.parametrize("se", ["hc1", "hac"])
def test_robust_covariance_on_bundled_sample_full_sample_mode(se):
    x, y = sample_panel(("AAPL", "JPM", "KO"), "2009-01-01", "2019-02-22", drop_seed=5)
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=0, min_obs=126)
    worst, count = worst_cov_error(x, y, fit, se, None, rows=(0, x.shape[0] - 1))
    assert count == 6
    assert worst < RTOL, worst


@needs_sample
@pytest.mark.slow
@pytest.mark.parametrize("se", ["hc1", "hac"])
def test_robust_covariance_on_the_whole_bundled_sample_every_window(se):
    """Every 252-day window of every stock of the sample, 2009-2019 (about 29,000 windows)."""
    tickers = ("AAPL", "MSFT", "INTC", "JPM", "GS", "XOM", "JNJ", "PG", "KO", "WMT", "SPY", "QQQ")
    x, y = sample_panel(tickers, "2009-01-01", "2019-02-22")
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=252, min_obs=126)
    worst, count = worst_cov_error(x, y, fit, se, None)
    assert count > 25_000
    assert worst < RTOL, worst


def test_classical_inference_is_the_fits_own_covariance(panel):
    x, y = panel
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=45, min_obs=20)
    inf = robust_covariance(torch.from_numpy(x), torch.from_numpy(y), fit, se="classical")
    assert inf.use_t
    assert inf.se_type == "classical"
    assert inf.cov_unique is fit.cov_unique
    assert classical_inference(fit).gamma_se is fit.gamma_se


def test_hac_with_zero_lags_is_hc0(panel):
    x, y = panel
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    fit = quadratic_fit(xt, yt, window=45, min_obs=20)
    hac0 = robust_covariance(xt, yt, fit, se="hac", hac_lags=0).cov_unique
    hc1 = robust_covariance(xt, yt, fit, se="hc1").cov_unique
    n = fit.n_obs.to(torch.float64)[..., None]
    torch.testing.assert_close(hac0, hc1 * (n - 3.0) / n, rtol=1e-12, atol=0.0, equal_nan=True)


def test_gather_windows_compacts_valid_observations_to_the_right():
    x = torch.tensor([[0.1, np.nan, 0.3, 0.4, 0.5, 0.6]], dtype=torch.float64).T
    y = torch.tensor([[1.0, 2.0, np.nan, 4.0, 5.0, 6.0]], dtype=torch.float64).T
    batch = gather_windows(x, y, 4, torch.tensor([0, 0, 0]), torch.tensor([0, 3, 5]))
    assert batch.n.tolist() == [1, 2, 3]
    assert batch.mask.tolist() == [
        [False, False, False, True],
        [False, False, True, True],
        [False, True, True, True],
    ]
    assert batch.x[2].tolist() == [0.0, 0.4, 0.5, 0.6]
    assert batch.y[1].tolist() == [0.0, 0.0, 1.0, 4.0]  # rows 0..3: the valid ones are 0 and 3
    full = gather_windows(x, y, 0, torch.tensor([0]), torch.tensor([0]))
    assert full.n.tolist() == [4]
    assert full.y[0].tolist() == [0.0, 0.0, 1.0, 4.0, 5.0, 6.0]


def test_robust_covariance_rejects_bad_arguments(panel):
    x, y = panel
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    fit = quadratic_fit(xt, yt, window=45, min_obs=20)
    with pytest.raises(ConfigError, match=r"se must be one of 'classical', 'hc1', 'hac', got 'hc3'"):
        robust_covariance(xt, yt, fit, se="hc3")
    with pytest.raises(ConfigError, match="hac_lags must be >= 0, got -2"):
        robust_covariance(xt, yt, fit, se="hac", hac_lags=-2)
    with pytest.raises(ConfigError, match=r"hac_lags must be an integer >= 0 or None, got 2\.5"):
        robust_covariance(xt, yt, fit, se="hac", hac_lags=2.5)  # type: ignore[arg-type]
    with pytest.raises(DataValidationError, match=r"must have the fit's shape \(240, 5\), got \(239, 5\)"):
        robust_covariance(xt[1:], yt[1:], fit, se="hc1")


def test_newey_west_lags_rule():
    assert [newey_west_lags(n) for n in (4, 50, 100, 126, 252, 1000, 2520)] == [1, 3, 4, 4, 4, 6, 8]
    assert newey_west_lags(252) == math.floor(4 * (252 / 100) ** (2 / 9))
    with pytest.raises(ConfigError, match="n must be an integer >= 0, got -1"):
        newey_west_lags(-1)


@pytest.mark.parametrize(("se", "lags"), [("classical", None), ("hc1", None), ("hac", 5)])
def test_coefficient_tests_match_statsmodels_t_and_p_values(panel, se, lags):
    """Classical: Student-t at n - 3 (statsmodels' use_t); robust: normal (its default)."""
    x, y = panel
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    fit = quadratic_fit(xt, yt, window=45, min_obs=20)
    inf = robust_covariance(xt, yt, fit, se=se, hac_lags=lags)
    tests = coefficient_tests(fit, inf)
    checked = 0
    for i in range(x.shape[1]):
        for t in range(44, x.shape[0], 7):
            if not bool(fit.valid[t, i]):
                assert math.isnan(tests.gamma_p[t, i].item())
                continue
            res = sm_fit(*window_data(x, y, t, i, 45), se, lags)
            assert res.use_t == (se == "classical")
            assert tests.gamma_t[t, i].item() == pytest.approx(res.tvalues[2], rel=RTOL)
            assert tests.gamma_p[t, i].item() == pytest.approx(res.pvalues[2], rel=1e-9, abs=1e-15)
            checked += 1
    assert checked > 50


def test_information_criteria_match_statsmodels_aic(panel):
    x, y = panel
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=45, min_obs=20)
    crit = information_criteria(fit)
    checked = 0
    for i in range(x.shape[1]):
        for t in range(44, x.shape[0], 5):
            if not bool(fit.valid[t, i]):
                assert math.isnan(crit.delta_aic[t, i].item())
                continue
            xs, ys = window_data(x, y, t, i, 45)
            quad = sm.OLS(ys, np.column_stack([np.ones(xs.size), xs, xs * xs])).fit()
            lin = sm.OLS(ys, np.column_stack([np.ones(xs.size), xs])).fit()
            assert crit.aic_quadratic[t, i].item() == pytest.approx(quad.aic, rel=1e-10)
            assert crit.aic_linear[t, i].item() == pytest.approx(lin.aic, rel=1e-10)
            assert crit.delta_aic[t, i].item() == pytest.approx(quad.aic - lin.aic, rel=1e-7, abs=1e-9)
            checked += 1
    assert checked > 100


def exact_t_p(t: float, dof: int) -> float:
    """``P(|T| > |t|)`` to 40 digits: the regularized incomplete beta ``I_x(dof/2, 1/2)`` (mpmath)."""
    mpmath.mp.dps = 40
    tt, nu = mpmath.mpf(t), mpmath.mpf(dof)
    return float(mpmath.betainc(nu / 2, mpmath.mpf(1) / 2, 0, nu / (nu + tt * tt), regularized=True))


def test_student_t_two_sided_p_matches_an_exact_oracle():
    """mpmath to 40 digits (scipy's ``t.sf`` itself loses digits near t = 0 for small dof)."""
    t = np.array([0.0, 1e-8, 0.3, -1.0, 1.96, 2.5, -4.0, 8.0, 15.0, 40.0, 300.0])
    for dof in (1, 2, 3, 4, 7, 30, 121, 249, 1000, 5000, 50_000):
        got = student_t_two_sided_p(torch.from_numpy(t), torch.full((t.size,), float(dof))).numpy()
        expected = np.array([exact_t_p(v, dof) for v in t])
        np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-300, err_msg=f"dof={dof}")
        typical = np.abs(t) < 10
        np.testing.assert_allclose(got[typical], 2 * stats.t.sf(np.abs(t[typical]), dof), rtol=1e-8)
    nan = student_t_two_sided_p(torch.tensor([math.nan, 1.0, 1.0]), torch.tensor([5.0, math.nan, 0.0]))
    assert torch.isnan(nan).all()
    assert student_t_two_sided_p(torch.tensor([math.inf]), torch.tensor([10.0])).item() == 0.0


def test_student_t_two_sided_p_is_the_same_bits_in_any_chunking_and_shape():
    """Large panels go in chunks on several threads, with elements frozen and compacted as they
    converge: each element's value must not depend on its neighbours, on the chunking or on
    the threads (pieces below one chunk take the direct path)."""
    rng = np.random.default_rng(12)
    n = 5 * (CHUNK_CELLS // 2 + 12_345)  # three chunks, five columns
    t = rng.standard_normal(n) * rng.choice([0.3, 2.0, 6.0, 50.0], n)
    t[::97], t[::101], t[::107] = math.nan, -math.inf, 0.0
    dof = rng.integers(1, 400, n).astype(float)
    dof[::89], dof[::113] = math.nan, 0.0
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        whole = student_t_two_sided_p(
            torch.from_numpy(t).reshape(-1, 5), torch.from_numpy(dof).reshape(-1, 5)
        )
    finally:
        torch.set_num_threads(before)
    assert whole.shape == (n // 5, 5)
    pieces = torch.cat(
        [
            student_t_two_sided_p(torch.from_numpy(t[i : i + 5_000]), torch.from_numpy(dof[i : i + 5_000]))
            for i in range(0, n, 5_000)
        ]
    )
    torch.testing.assert_close(whole.reshape(-1), pieces, rtol=0, atol=0, equal_nan=True)
    sample = rng.choice(np.flatnonzero(np.isfinite(t) & (dof > 0) & np.isfinite(dof)), 40, replace=False)
    expected = np.array([exact_t_p(t[i], int(dof[i])) for i in sample])
    np.testing.assert_allclose(whole.reshape(-1).numpy()[sample], expected, rtol=1e-11, atol=1e-300)


def test_normal_two_sided_p_matches_scipy():
    z = np.array([0.0, 0.5, -1.96, 3.0, 8.0, -20.0, 37.0])
    np.testing.assert_allclose(
        normal_two_sided_p(torch.from_numpy(z)).numpy(), 2 * stats.norm.sf(np.abs(z)), rtol=1e-12
    )
    assert math.isnan(normal_two_sided_p(torch.tensor([math.nan])).item())


def test_robust_inference_of_an_empty_or_unfitted_panel_is_nan():
    x = torch.full((30, 2), math.nan, dtype=torch.float64)
    fit = quadratic_fit(x, x, window=10, min_obs=5)
    inf = robust_covariance(x, x, fit, se="hac")
    assert torch.isnan(inf.cov_unique).all()
    assert inf.cov_unique.shape == (30, 2, 6)
    empty = torch.empty((0, 3), dtype=torch.float64)
    fit0 = quadratic_fit(empty, empty, window=0, min_obs=5)
    assert robust_covariance(empty, empty, fit0, se="hc1").beta_se.shape == (0, 3)
