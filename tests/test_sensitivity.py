"""Autograd sensitivities, delta-method standard errors and the Student-t quantile.

Oracles: the closed form ``beta + 2*gamma*x``, central finite differences of the fitted
quadratic, ``sqrt(g' Sigma g)`` with statsmodels' ``cov_params``, and ``scipy.stats.t``
(scipy is a test-only dependency, via statsmodels).
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import statsmodels.api as sm
import torch
from scipy import stats

from sensitivity.errors import ConfigError, DataValidationError
from sensitivity.model import quadratic_fit
from sensitivity.sensitivity import daily_sensitivity, fitted_return, student_t_quantile


def panel(seed: int = 1, t_rows: int = 300, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0003, 0.01, (t_rows, n))
    y = 0.0005 + rng.uniform(0.6, 1.5, n) * x + rng.normal(0, 5, n) * x * x + rng.normal(0, 0.01, (t_rows, n))
    y[rng.random((t_rows, n)) < 0.1] = np.nan
    x[rng.random((t_rows, n)) < 0.03] = np.nan
    y[:120, 3] = np.nan  # a late listing: NaN fits early on
    return x, y


@pytest.fixture(scope="module")
def fitted():
    x, y = panel()
    xt = torch.from_numpy(x)
    fit = quadratic_fit(xt, torch.from_numpy(y), window=60, min_obs=30)
    return x, y, fit, daily_sensitivity(fit, xt)


def test_daily_sensitivity_equals_closed_form(fitted):
    x, _, fit, res = fitted
    closed = fit.beta + 2.0 * fit.gamma * torch.from_numpy(x)
    assert torch.equal(torch.isnan(res.sensitivity), torch.isnan(closed))
    ok = torch.isfinite(closed)
    assert ok.sum() > 500
    torch.testing.assert_close(res.sensitivity[ok], closed[ok], rtol=1e-12, atol=1e-12)


def test_daily_sensitivity_matches_central_finite_differences(fitted):
    x, _, fit, res = fitted
    xt = torch.from_numpy(x)
    h = 1e-4
    up = fitted_return(fit.alpha, fit.beta, fit.gamma, xt + h)
    down = fitted_return(fit.alpha, fit.beta, fit.gamma, xt - h)
    fd = (up - down) / (2 * h)  # exact for a quadratic up to rounding
    ok = torch.isfinite(fd)
    torch.testing.assert_close(res.sensitivity[ok], fd[ok], rtol=1e-8, atol=1e-9)


def test_daily_sensitivity_works_in_inference_mode_and_on_inference_tensors(fitted):
    """Autograd refuses inference tensors; the results must not depend on how the caller ran."""
    x, y, _, res = fitted
    with torch.inference_mode():
        xi = torch.from_numpy(x).clone()
        fit = quadratic_fit(xi, torch.from_numpy(y).clone(), window=60, min_obs=30)
        inside = daily_sensitivity(fit, xi)
    outside = daily_sensitivity(fit, xi)
    for got in (inside, outside):
        for name in ("sensitivity", "sensitivity_se", "sensitivity_ci_lower", "sensitivity_ci_upper"):
            torch.testing.assert_close(getattr(got, name), getattr(res, name), rtol=0, atol=0, equal_nan=True)


def test_daily_sensitivity_does_not_load_torchs_compiler():
    """torch.func's transforms import torch._dynamo on first use (1.5 to 1.9 s of every process
    that computes a sensitivity), explicit grad_outputs torch.fx's symbolic shapes (0.4 s).  A
    fresh interpreter checks that the path stays clear of both."""
    code = (
        "import sys, torch\n"
        "from sensitivity.model import quadratic_fit\n"
        "from sensitivity.sensitivity import daily_sensitivity\n"
        "heavy = ('torch._dynamo', 'torch.fx.experimental.symbolic_shapes')\n"
        "before = [m in sys.modules for m in heavy]\n"
        "x = torch.linspace(-0.02, 0.03, 200, dtype=torch.float64).reshape(100, 2)\n"
        "fit = quadratic_fit(x, 0.5 * x + x * x * x, window=50, min_obs=20)\n"
        "daily_sensitivity(fit, x)\n"
        "print(*[m for m, b in zip(heavy, before) if not b and m in sys.modules])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == []


def test_daily_sensitivity_se_matches_delta_method_with_statsmodels_cov(fitted):
    x, y, _, res = fitted
    checked = 0
    for i in range(x.shape[1]):
        for t in range(59, x.shape[0], 17):
            if not math.isfinite(res.sensitivity[t, i].item()):
                continue
            xs, ys = x[t - 59 : t + 1, i], y[t - 59 : t + 1, i]
            ok = np.isfinite(xs) & np.isfinite(ys)
            ols = sm.OLS(ys[ok], np.column_stack([np.ones(ok.sum()), xs[ok], xs[ok] ** 2])).fit()
            g = np.array([0.0, 1.0, 2.0 * x[t, i]])
            se = math.sqrt(g @ ols.cov_params() @ g)
            sens = ols.params[1] + 2 * ols.params[2] * x[t, i]
            assert res.sensitivity_se[t, i].item() == pytest.approx(se, rel=1e-8)
            assert res.sensitivity[t, i].item() == pytest.approx(sens, rel=1e-8, abs=1e-8 * se)
            q = stats.t.ppf(0.975, ols.df_resid)
            assert res.sensitivity_ci_lower[t, i].item() == pytest.approx(
                sens - q * se, rel=1e-8, abs=1e-8 * se
            )
            assert res.sensitivity_ci_upper[t, i].item() == pytest.approx(
                sens + q * se, rel=1e-8, abs=1e-8 * se
            )
            checked += 1
    assert checked > 30


def test_daily_sensitivity_interval_uses_student_t_at_n_obs_minus_3(fitted):
    _, _, fit, res = fitted
    ok = torch.isfinite(res.sensitivity)
    half = (res.sensitivity_ci_upper - res.sensitivity)[ok]
    dof = (fit.n_obs.to(torch.float64) - 3.0)[ok]
    expected = torch.from_numpy(stats.t.ppf(0.975, dof.numpy())) * res.sensitivity_se[ok]
    torch.testing.assert_close(half, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close((res.sensitivity - res.sensitivity_ci_lower)[ok], half, rtol=1e-12, atol=1e-15)
    assert res.level == 0.95


def test_daily_sensitivity_is_nan_where_the_fit_is(fitted):
    _, _, fit, res = fitted
    missing = ~fit.valid
    assert missing.any()
    for v in (res.sensitivity, res.sensitivity_se, res.sensitivity_ci_lower, res.sensitivity_ci_upper):
        assert torch.isnan(v[missing]).all()


def test_daily_sensitivity_in_chunks_on_threads_equals_each_ticker_alone():
    """A panel of several chunks (2^17 cells each) on worker threads gives every ticker the
    bits it gets alone; so do rows cut from a fit (one row, as the API evaluates the latest)
    and a full-sample fit, whose largest dof is not bounded by a window."""
    x, y = panel(seed=5, t_rows=4000, n=80)  # 320,000 cells: three chunks
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for window in (252, 0):
        fit = quadratic_fit(xt, yt, window=window, min_obs=30)
        whole = daily_sensitivity(fit, xt)
        assert torch.isfinite(whole.sensitivity).sum() > 100_000
        for j in (0, 3, 41, 79):
            alone_fit = quadratic_fit(xt[:, j : j + 1], yt[:, j : j + 1], window=window, min_obs=30)
            alone = daily_sensitivity(alone_fit, xt[:, j : j + 1])
            for name in ("sensitivity", "sensitivity_se", "sensitivity_ci_lower", "sensitivity_ci_upper"):
                got, want = getattr(whole, name)[:, j], getattr(alone, name)[:, 0]
                assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)), (window, j, name)
        last = dataclasses.replace(
            fit,
            **{
                f.name: getattr(fit, f.name)[-1:]
                for f in dataclasses.fields(fit)
                if f.name not in ("window", "min_obs")
            },
        )
        one = daily_sensitivity(last, xt[-1:])
        assert torch.equal(
            one.sensitivity_ci_upper.nan_to_num(7.0), whole.sensitivity_ci_upper[-1:].nan_to_num(7.0)
        )


def test_daily_sensitivity_reuses_a_quantile_table_that_nobody_alters(fitted):
    """The t-quantile table is cached per (level, window): every call reads the one the first
    call built, so no call may change it, and calls with another level use their own."""
    from sensitivity.sensitivity import _t_quantile_table, _t_quantiles_upto

    x, _, fit, first = fitted
    xt = torch.from_numpy(x)
    again = daily_sensitivity(fit, xt)
    other = daily_sensitivity(fit, xt, level=0.9)
    third = daily_sensitivity(fit, xt)
    for res in (again, third):
        for name in ("sensitivity_se", "sensitivity_ci_lower", "sensitivity_ci_upper"):
            assert torch.equal(getattr(res, name).nan_to_num(7.0), getattr(first, name).nan_to_num(7.0))
    assert not torch.equal(
        other.sensitivity_ci_upper.nan_to_num(7.0), first.sensitivity_ci_upper.nan_to_num(7.0)
    )
    top = fit.window - 3
    cached = _t_quantiles_upto(0.975, top, torch.device("cpu"))
    assert cached is _t_quantiles_upto(0.975, top, torch.device("cpu"))
    fresh = _t_quantile_table(0.975, torch.arange(top + 1))
    assert torch.equal(cached.nan_to_num(7.0), fresh.nan_to_num(7.0))


def test_daily_sensitivity_other_level():
    x, y = panel(seed=3)
    xt = torch.from_numpy(x)
    fit = quadratic_fit(xt, torch.from_numpy(y), window=50, min_obs=20)
    res = daily_sensitivity(fit, xt, level=0.9)
    ok = torch.isfinite(res.sensitivity)
    q = torch.from_numpy(stats.t.ppf(0.95, fit.dof[ok].numpy()))
    torch.testing.assert_close(res.sensitivity_ci_upper[ok], res.sensitivity[ok] + q * res.sensitivity_se[ok])


@pytest.mark.parametrize("level", [0.0, 1.0, 1.5, -0.1, "0.95", True])
def test_daily_sensitivity_rejects_bad_level(fitted, level):
    x, _, fit, _ = fitted
    with pytest.raises(ConfigError, match=r"level must be"):
        daily_sensitivity(fit, torch.from_numpy(x), level=level)


def test_daily_sensitivity_rejects_x_of_another_shape(fitted):
    _, _, fit, _ = fitted
    with pytest.raises(
        DataValidationError, match=r"x must be a tensor of the fit's shape \(300, 4\), got \(3, 4\)"
    ):
        daily_sensitivity(fit, torch.zeros(3, 4))


def test_student_t_quantile_matches_scipy():
    nu = torch.cat((torch.arange(1, 3001, dtype=torch.float64), torch.tensor([4000.0, 25_000.0, 1e6])))
    for p in (0.975, 0.95, 0.995, 0.9995, 0.6, 0.025, 0.1):
        expected = stats.t.ppf(p, nu.numpy())
        got = student_t_quantile(p, nu).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=f"p={p}")


def test_student_t_quantile_special_values():
    nu = torch.tensor([[1.0, 2.0], [float("nan"), 7.0]])
    out = student_t_quantile(0.975, nu)
    assert out.shape == (2, 2)
    assert math.isnan(out[1, 0].item())
    assert out[0, 0].item() == pytest.approx(math.tan(math.pi * 0.475), rel=1e-14)  # Cauchy
    assert out[0, 1].item() == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)), rel=1e-14)
    torch.testing.assert_close(student_t_quantile(0.2, nu), -student_t_quantile(0.8, nu), equal_nan=True)
    assert student_t_quantile(0.5, nu)[0].tolist() == [0.0, 0.0]
    assert student_t_quantile(0.975, torch.tensor([5, 9])).dtype == torch.float64


@pytest.mark.parametrize(
    ("p", "dof", "error", "message"),
    [
        (1.0, [5.0], ConfigError, r"p must be a probability in \(0, 1\), got 1.0"),
        (0.0, [5.0], ConfigError, r"p must be a probability in \(0, 1\), got 0.0"),
        (0.9, [2.5], DataValidationError, "dof must be positive integers .*got 2.5"),
        (0.9, [0.0], DataValidationError, "dof must be positive integers .*got 0.0"),
        (0.9, [float("inf")], DataValidationError, "dof must be positive integers .*got inf"),
    ],
    ids=["p-one", "p-zero", "fractional-dof", "zero-dof", "infinite-dof"],
)
def test_student_t_quantile_rejects_bad_input(p, dof, error, message):
    with pytest.raises(error, match=message):
        student_t_quantile(p, torch.tensor(dof))
