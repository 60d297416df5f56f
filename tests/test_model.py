"""The batched rolling quadratic fit against independent oracles.

Oracles: a statsmodels OLS refit on every window (as statsmodels' own rolling tests do), statsmodels
``RollingOLS(..., expanding=True)``, and an exact 50-digit least-squares solution (mpmath) where
the raw design is too ill-conditioned for statsmodels itself.
"""

from __future__ import annotations

import math
import threading

import mpmath
import numpy as np
import pytest
import statsmodels.api as sm
import torch
from statsmodels.regression.rolling import RollingOLS

from sensitivity.errors import ConfigError, DataValidationError
from sensitivity.model import COV_ENTRIES, QuadraticFit, default_chunk_size, quadratic_fit, resolve_device

RTOL = 1e-8


def synthetic_panel(
    seed: int = 7, t_rows: int = 360, per_stock_x: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Index and stock returns [T, 5] with known truth, gaps, a late listing and a delisting.

    Columns: 0 complete; 1 random gaps; 2 listed late; 3 delisted; 4 a long suspension (its
    windows fall below min_obs for a while).  With ``per_stock_x`` a stock's index return on the
    day after a gap spans the gap (compounded), as the pipeline aligns each stock separately.
    """
    rng = np.random.default_rng(seed)
    n = 5
    market = rng.standard_t(5, t_rows) * 0.008 + 0.0004
    y = np.empty((t_rows, n))
    present = np.ones((t_rows, n), dtype=bool)
    present[rng.random(t_rows) < 0.12, 1] = False
    present[: t_rows // 3, 2] = False
    present[int(t_rows * 0.8) :, 3] = False
    present[100:170, 4] = False
    x = np.repeat(market[:, None], n, axis=1)
    if per_stock_x:
        for i in range(n):
            growth = 1.0
            for t in range(t_rows):
                growth *= 1.0 + market[t]
                if present[t, i]:
                    x[t, i] = growth - 1.0
                    growth = 1.0
    alpha = rng.normal(0.0, 0.001, n)
    beta = rng.uniform(0.5, 1.6, n)
    gamma = rng.normal(0.0, 4.0, n)
    y = alpha + beta * x + gamma * x * x + rng.normal(0.0, 0.012, (t_rows, n))
    y[~present] = np.nan
    x[~present & (rng.random((t_rows, n)) < 0.5)] = np.nan  # the index side may be missing too
    return x, y


def window_rows(t: int, window: int, t_rows: int) -> slice:
    return slice(0, t_rows) if window == 0 else slice(max(0, t - window + 1), t + 1)


def ols(xw: np.ndarray, yw: np.ndarray) -> tuple[sm.regression.linear_model.RegressionResults, float, float]:
    """statsmodels OLS of y on [1, x, x^2] over the valid rows, and the linear slope and its se."""
    ok = np.isfinite(xw) & np.isfinite(yw)
    xs, ys = xw[ok], yw[ok]
    quad = sm.OLS(ys, np.column_stack([np.ones(ok.sum()), xs, xs * xs])).fit()
    lin = sm.OLS(ys, np.column_stack([np.ones(ok.sum()), xs])).fit()
    return quad, float(lin.params[1]), float(lin.bse[1])


def assert_close(got: float, expected: float, scale: float, rtol: float = RTOL, what: str = "") -> None:
    """``|got - expected| <= rtol * max(|expected|, scale)``: relative, with an absolute floor."""
    tol = rtol * max(abs(expected), scale)
    assert abs(got - expected) <= tol, f"{what}: got {got!r}, expected {expected!r} (tol {tol:.3g})"


def check_window(fit: QuadraticFit, x: np.ndarray, y: np.ndarray, t: int, i: int, rtol: float = RTOL) -> None:
    rows = window_rows(t, fit.window, x.shape[0])
    res, lin_slope, lin_se = ols(x[rows, i], y[rows, i])
    where = f"row {t}, column {i}"
    params = (fit.alpha[t, i].item(), fit.beta[t, i].item(), fit.gamma[t, i].item())
    ses = (fit.alpha_se[t, i].item(), fit.beta_se[t, i].item(), fit.gamma_se[t, i].item())
    cov = res.cov_params()
    for k in range(3):
        assert_close(params[k], res.params[k], res.bse[k], rtol, f"param {k} at {where}")
        assert_close(ses[k], res.bse[k], 0.0, rtol, f"se {k} at {where}")
        for j in range(3):
            scale = math.sqrt(cov[k, k] * cov[j, j])
            assert_close(fit.covariance[t, i, k, j].item(), cov[k, j], scale, rtol, f"cov {k}{j} at {where}")
    assert_close(fit.rss[t, i].item(), res.ssr, 0.0, rtol, f"rss at {where}")
    assert_close(fit.r2[t, i].item(), res.rsquared, 1e-3, rtol, f"r2 at {where}")
    assert_close(fit.linear_beta[t, i].item(), lin_slope, lin_se, rtol, f"linear_beta at {where}")
    assert fit.dof[t, i].item() == res.df_resid


@pytest.fixture(scope="module")
def panel() -> tuple[np.ndarray, np.ndarray]:
    return synthetic_panel(t_rows=362)


@pytest.mark.parametrize(
    ("window", "min_obs"),
    [(55, 25), (5, 4), (0, 25), (1000, 25)],
    ids=["rolling-55", "rolling-5", "full-sample", "window-beyond-T"],
)
def test_quadratic_fit_matches_statsmodels_ols_on_every_window(panel, window, min_obs):
    """T = 362 is a multiple of neither 55 nor 5: the last block is partial (padded)."""
    x, y = panel
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=window, min_obs=min_obs)
    t_rows, n = x.shape
    fitted = 0
    rows = range(t_rows) if window != 0 else (0, t_rows // 2, t_rows - 1)
    for i in range(n):
        for t in rows:
            sl = window_rows(t, window, t_rows)
            n_obs = int((np.isfinite(x[sl, i]) & np.isfinite(y[sl, i])).sum())
            assert fit.n_obs[t, i].item() == n_obs
            if n_obs < min_obs:
                assert math.isnan(fit.beta[t, i].item())
                continue
            check_window(fit, x, y, t, i)
            fitted += 1
    assert fitted > (t_rows * n) // 2 if window else fitted == 3 * n


def test_quadratic_fit_matches_rolling_ols_expanding(panel):
    x, y = panel
    window, min_obs = 60, 25
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=window, min_obs=min_obs)
    for i in range(x.shape[1]):
        exog = np.column_stack([np.ones(len(x)), x[:, i], x[:, i] ** 2])
        res = RollingOLS(y[:, i], exog, window=window, min_nobs=min_obs, expanding=True).fit()
        params = np.asarray(res.params)
        ok = np.isfinite(params[:, 1])
        np.testing.assert_array_equal(ok, fit.valid[:, i].numpy())
        se = np.asarray(res.bse)[ok]
        ours = fit.params[:, i].numpy()[ok]
        np.testing.assert_array_less(np.abs(ours - params[ok]), RTOL * np.maximum(np.abs(params[ok]), se))
        ours_se = torch.stack((fit.alpha_se, fit.beta_se, fit.gamma_se), -1)[:, i].numpy()[ok]
        np.testing.assert_allclose(ours_se, se, rtol=RTOL)
        cov = np.asarray(res.cov_params())[ok]
        scale = np.sqrt(np.einsum("ti,tj->tij", se**2, se**2))
        assert (np.abs(fit.covariance[:, i].numpy()[ok] - cov) <= RTOL * scale).all()
        np.testing.assert_allclose(fit.r2[:, i].numpy()[ok], np.asarray(res.rsquared)[ok], rtol=RTOL)
        np.testing.assert_array_equal(fit.n_obs[:, i].numpy()[ok], np.asarray(res.nobs)[ok])


def test_quadratic_fit_window_zero_is_one_fit_on_every_row(panel):
    x, y = panel
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=0, min_obs=10)
    for name in ("alpha", "beta", "gamma", "r2", "beta_se", "linear_beta"):
        v = getattr(fit, name)
        assert torch.equal(v, v[:1].expand_as(v)), name
    assert (fit.n_obs == fit.n_obs[:1]).all()


def test_quadratic_fit_long_series_does_not_drift():
    """Block-restarted sums: the last windows of a long series are as exact as the first."""
    rng = np.random.default_rng(3)
    t_rows, window = 20_000, 40
    x = rng.normal(0.002, 0.01, (t_rows, 1))
    y = 0.01 + 0.9 * x - 2.0 * x * x + rng.normal(0, 0.01, (t_rows, 1))
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=window, min_obs=20)
    for t in (window - 1, t_rows // 2, t_rows - 7, t_rows - 1):
        check_window(fit, x, y, t, 0, rtol=1e-9)


def exact_ls(xw: np.ndarray, yw: np.ndarray) -> np.ndarray:
    """Least squares of y on [1, x, x^2] in 50-digit arithmetic (normal equations, exact inputs)."""
    mpmath.mp.dps = 50
    xs = [mpmath.mpf(float(v)) for v in xw]
    design = mpmath.matrix([[1, v, v * v] for v in xs])
    target = mpmath.matrix([mpmath.mpf(float(v)) for v in yw])
    sol = mpmath.lu_solve(design.T * design, design.T * target)
    return np.array([float(v) for v in sol])


@pytest.mark.parametrize(
    ("shift", "scale"),
    [(0.0, 1.0), (5.0, 1.0), (100.0, 1e4), (-3.0, 1e-3)],
    ids=["returns", "level-5", "level-100-scaled", "tiny-units"],
)
def test_quadratic_fit_is_exact_where_the_raw_design_is_ill_conditioned(shift, scale):
    """Local centring keeps full accuracy when x sits far from 0 (statsmodels' pinv does not)."""
    rng = np.random.default_rng(11)
    t_rows, window = 240, 80
    base = rng.normal(0.0, 0.01, (t_rows, 1))
    x = base * scale + shift
    y = 0.002 + 1.1 * base + 4.0 * base**2 + rng.normal(0, 0.01, (t_rows, 1))
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=window, min_obs=30)
    for t in (79, 150, 239):
        expected = exact_ls(x[t - window + 1 : t + 1, 0], y[t - window + 1 : t + 1, 0])
        np.testing.assert_allclose(fit.params[t, 0].numpy(), expected, rtol=1e-9)


def test_quadratic_fit_near_perfect_fit_keeps_rss_within_documented_bound():
    rng = np.random.default_rng(5)
    x = rng.normal(0.0, 0.01, (200, 1))
    y = 0.001 + 1.3 * x + 2.0 * x * x + rng.normal(0, 1e-5, (200, 1))  # 1 - R^2 ~ 1e-6
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=100, min_obs=50)
    res, _, _ = ols(x[100:200, 0], y[100:200, 0])
    assert 1.0 - res.rsquared < 1e-5
    assert_close(fit.rss[199, 0].item(), res.ssr, 0.0, 1e-8, "rss")
    assert_close(fit.beta[199, 0].item(), res.params[1], res.bse[1], 1e-8, "beta")


def test_quadratic_fit_rows_below_min_obs_are_nan_with_n_obs_counted():
    x, y = synthetic_panel(per_stock_x=False)
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=60, min_obs=40)
    low = fit.n_obs < 40
    assert low.any()
    assert (~low).any()
    for name in (
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
    ):
        v = getattr(fit, name)
        assert torch.isnan(v[low]).all(), name
        assert torch.isfinite(v[~low]).all(), name
    assert torch.isnan(fit.cov_unique[low]).all()
    assert fit.n_obs.dtype == torch.int64


@pytest.mark.parametrize(
    "kind", ["constant-index", "two-values", "constant-then-moves"], ids=lambda k: str(k)
)
def test_quadratic_fit_singular_design_is_nan_not_garbage(kind):
    rng = np.random.default_rng(2)
    t_rows = 120
    if kind == "constant-index":
        x = np.full((t_rows, 1), 0.0123)
    elif kind == "two-values":
        x = rng.choice([-0.01, 0.02], size=(t_rows, 1))
    else:
        x = np.full((t_rows, 1), 0.004)
        x[80:] = rng.normal(0, 0.01, (40, 1))
    y = 0.5 * x + rng.normal(0, 0.01, (t_rows, 1))
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=30, min_obs=10)
    if kind == "constant-then-moves":
        assert torch.isnan(fit.beta[:80]).all()
        assert torch.isfinite(fit.beta[80 + 10 :]).all()  # three distinct values suffice
    else:
        assert torch.isnan(fit.beta).all()
        assert torch.isnan(fit.covariance).all()
        assert torch.isnan(fit.linear_beta).all()
    assert (fit.n_obs[29:] == 30).all()


@pytest.mark.parametrize("seed", range(6))
def test_quadratic_fit_two_valued_index_is_always_singular(seed):
    """Rounding noise never lets a collinear window through: with gaps, any window length, any
    balance of the two values, and a block pair whose other half moves freely."""
    rng = np.random.default_rng(seed)
    values = rng.normal(0.0, 0.02, 2) + rng.normal(0.0, 0.05)
    x = rng.choice(values, size=(500, 3), p=[0.5, 0.5] if seed % 3 else [0.9, 0.1])
    x[rng.random((500, 3)) < 0.2] = np.nan
    free = seed % 2 == 1
    if free:
        x[:250] = rng.normal(0.0, 0.03, (250, 3))
    y = rng.normal(0.0, 0.01, (500, 3))
    window = int(rng.integers(20, 200))
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=window, min_obs=10)
    start = 250 + window if free else 0
    assert torch.isnan(fit.beta[start:]).all()
    if free:
        assert torch.isfinite(fit.beta[window:250]).all()


def test_quadratic_fit_constant_stock_returns_give_zero_slope_and_nan_r2():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 0.01, (80, 1))
    y = np.zeros((80, 1))  # a stock whose price did not move
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=40, min_obs=20)
    assert torch.equal(fit.beta[19:], torch.zeros_like(fit.beta[19:]))
    assert torch.isnan(fit.r2).all()
    assert (fit.beta_se[19:] == 0).all()


@pytest.mark.parametrize("side", ["x", "y", "both"])
def test_quadratic_fit_counts_infinities_as_missing_exactly_like_nan(panel, side):
    """Any non-finite value marks a missing observation: +inf, -inf and NaN give the same bits."""
    x, y = panel
    rng = np.random.default_rng(3)
    holes = rng.random(x.shape) < 0.08
    signs = np.where(rng.random(x.shape) < 0.5, np.inf, -np.inf)
    xi, yi, xn, yn = x.copy(), y.copy(), x.copy(), y.copy()
    if side in ("x", "both"):
        xi[holes], xn[holes] = signs[holes], np.nan
    if side in ("y", "both"):
        yi[holes], yn[holes] = signs[holes], np.nan
    with_inf = quadratic_fit(torch.from_numpy(xi), torch.from_numpy(yi), window=50, min_obs=20)
    with_nan = quadratic_fit(torch.from_numpy(xn), torch.from_numpy(yn), window=50, min_obs=20)
    for name in ("alpha", "beta", "gamma", "cov_unique", "rss", "r2", "linear_beta", "dof", "n_obs"):
        torch.testing.assert_close(
            getattr(with_inf, name), getattr(with_nan, name), rtol=0, atol=0, equal_nan=True
        )
    assert torch.isfinite(with_inf.beta).any()
    assert int(with_inf.n_obs[-1].min()) < 50  # the holes were counted as missing


def test_quadratic_fit_results_do_not_depend_on_chunk_size_or_dtype(panel):
    x, y = panel
    ref = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=50, min_obs=20)
    one = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=50, min_obs=20, chunk_size=1)
    for name in ("alpha", "beta", "gamma", "cov_unique", "r2", "n_obs"):
        torch.testing.assert_close(getattr(one, name), getattr(ref, name), rtol=0, atol=0, equal_nan=True)
    f32 = quadratic_fit(torch.from_numpy(x).float(), torch.from_numpy(y).float(), window=50, min_obs=20)
    assert f32.beta.dtype == torch.float64
    assert default_chunk_size(5000) >= 1


def test_quadratic_fit_on_worker_threads_gives_the_same_bits_and_puts_back_torch_threads(panel):
    x, y = panel
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # One chunk: the caller's thread; one column per chunk: two single-threaded workers.
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        whole = quadratic_fit(xt, yt, window=50, min_obs=20, chunk_size=x.shape[1])
        split = quadratic_fit(xt, yt, window=50, min_obs=20, chunk_size=1)
        assert torch.get_num_threads() == 2
        # The workers set torch's process-wide default to 1; a thread started afterwards must
        # get the caller's count back, not the workers'.
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [2]
    finally:
        torch.set_num_threads(before)
    for name in ("alpha", "beta", "gamma", "cov_unique", "rss", "r2", "linear_beta", "dof", "n_obs"):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), rtol=0, atol=0, equal_nan=True)


def test_quadratic_fit_covariance_is_symmetric_and_matches_unique_entries(panel):
    x, y = panel
    fit = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=60, min_obs=25)
    cov = fit.covariance
    assert cov.shape == (*x.shape, 3, 3)
    torch.testing.assert_close(cov, cov.transpose(-1, -2), equal_nan=True)
    assert len(COV_ENTRIES) == fit.cov_unique.shape[-1] == 6
    torch.testing.assert_close(cov[..., 1, 1].sqrt(), fit.beta_se, equal_nan=True)


def test_quadratic_fit_empty_panels():
    fit = quadratic_fit(torch.empty(0, 3, dtype=torch.float64), torch.empty(0, 3), window=10, min_obs=5)
    assert fit.shape == (0, 3)
    fit = quadratic_fit(torch.empty(7, 0, dtype=torch.float64), torch.empty(7, 0), window=0, min_obs=5)
    assert fit.beta.shape == (7, 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"window": -5}, ConfigError, "window must be >= 0, got -5"),
        ({"min_obs": 3}, ConfigError, "min_obs must be >= 4, got 3"),
        ({"window": 10, "min_obs": 20}, ConfigError, r"min_obs must be <= window .* min_obs=20 > window=10"),
        ({"window": 2.5}, ConfigError, "window must be an integer >= 0, got 2.5"),
        ({"window": True}, ConfigError, "window must be an integer >= 0, got True"),
        ({"chunk_size": 0}, ConfigError, "chunk_size must be >= 1, got 0"),
        ({"x": np.zeros((5, 2))}, DataValidationError, "x must be a torch.Tensor"),
        ({"y": torch.zeros(5)}, DataValidationError, r"y must be 2-dimensional \[T, N\], got shape \(5,\)"),
        ({"y": torch.zeros(4, 2)}, DataValidationError, r"same shape .* \(5, 2\) and \(4, 2\)"),
        (
            {"x": torch.zeros(5, 2, dtype=torch.bool)},
            DataValidationError,
            "real numbers, got dtype torch.bool",
        ),
    ],
    ids=[
        "negative-window",
        "min-obs",
        "min-obs-above-window",
        "float-window",
        "bool-window",
        "chunk-size",
        "numpy-x",
        "1d-y",
        "shape-mismatch",
        "bool-x",
    ],
)
def test_quadratic_fit_rejects_bad_arguments(kwargs, error, message):
    args = {
        "x": torch.zeros(5, 2, dtype=torch.float64),
        "y": torch.zeros(5, 2, dtype=torch.float64),
        "window": 4,
        "min_obs": 4,
    } | kwargs
    with pytest.raises(error, match=message):
        quadratic_fit(args.pop("x"), args.pop("y"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quadratic_fit_on_cuda_matches_cpu(panel):
    x, y = panel
    cpu = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=60, min_obs=25)
    gpu = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=60, min_obs=25, device="cuda")
    assert gpu.beta.device.type == "cuda"
    assert torch.equal(gpu.n_obs.cpu(), cpu.n_obs)
    # Within 1e-9 (the contract), each quantity on its own scale: a coefficient relative to
    # max(|value|, its standard error), a covariance entry relative to sqrt(var_i * var_j) (an
    # off-diagonal one can sit near zero: measured on an H100, alpha_beta differed by 1.5e-17
    # on a value of 9e-8: 1.7e-10 of itself, 4e-14 of its scale), R^2 and the linear slope
    # relative to themselves.
    for name in ("alpha", "beta", "gamma"):
        scale = torch.maximum(getattr(cpu, name).abs(), getattr(cpu, f"{name}_se"))
        _assert_within(getattr(gpu, name).cpu(), getattr(cpu, name), scale, name)
    variance = {
        e: cpu.cov_unique[..., i] for i, e in enumerate(COV_ENTRIES) if e.split("_")[0] == e.split("_")[1]
    }
    for i, entry in enumerate(COV_ENTRIES):
        a, b = entry.split("_")
        scale = (variance[f"{a}_{a}"] * variance[f"{b}_{b}"]).sqrt()
        _assert_within(gpu.cov_unique[..., i].cpu(), cpu.cov_unique[..., i], scale, f"cov {entry}")
    for name in ("r2", "linear_beta"):
        _assert_within(getattr(gpu, name).cpu(), getattr(cpu, name), getattr(cpu, name).abs(), name)


def _assert_within(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, what: str) -> None:
    """``|got - want| <= 1e-9 * scale`` wherever ``want`` is a number; NaN exactly where it is NaN."""
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern differs"
    ok = ~torch.isnan(want)
    assert ok.any(), f"{what}: nothing to compare"
    err = ((got[ok] - want[ok]).abs() / scale[ok].clamp(min=1e-300)).max().item()
    assert err <= 1e-9, f"{what}: max scaled difference {err:.2e}"


@pytest.mark.parametrize(
    ("device", "expected"),
    [(None, "cpu"), ("cpu", "cpu"), ("auto", "cuda" if torch.cuda.is_available() else "cpu")],
    ids=["none", "cpu", "auto"],
)
def test_resolve_device_auto_is_cuda_only_when_torch_sees_one(device, expected):
    assert resolve_device(device).type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_resolve_device_refuses_cuda_without_a_cuda_device():
    with pytest.raises(ConfigError, match=r"device 'cuda' was asked for but torch sees no CUDA device"):
        resolve_device("cuda")


def test_resolve_device_refuses_an_unknown_device():
    with pytest.raises(ConfigError, match=r"device must be \"auto\", \"cpu\" or \"cuda\".*'gpu'"):
        resolve_device("gpu")


def test_quadratic_fit_device_auto_gives_the_cpu_results_without_cuda(panel):
    x, y = panel
    ref = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=60, min_obs=25)
    auto = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=60, min_obs=25, device="auto")
    if auto.beta.device.type == "cpu":
        torch.testing.assert_close(auto.cov_unique, ref.cov_unique, rtol=0, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(auto.beta.cpu(), ref.beta, rtol=1e-9, atol=0, equal_nan=True)
