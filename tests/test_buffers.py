"""Kernel results written into reused storage (:class:`sensitivity.buffers.OutputBuffers`).

The oracle is the kernel without buffers: with them it must give the same bits, in every group
of a streaming loop whose groups grow and shrink, for rolling and full-sample fits; and the
documented sharing must hold (results are views of the buffers, a smaller call takes no new
memory, a larger one lets the old buffer go).
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch
from test_model import synthetic_panel

from sensitivity.buffers import OutputBuffers
from sensitivity.errors import DataValidationError
from sensitivity.model import QuadraticFit, quadratic_fit
from sensitivity.sensitivity import SensitivityResult, daily_sensitivity

#: Every tensor field of a fit (all of them are written into the buffers).
FIT_FIELDS = tuple(f.name for f in fields(QuadraticFit) if f.name not in ("window", "min_obs"))
SENS_FIELDS = ("sensitivity", "sensitivity_se", "sensitivity_ci_lower", "sensitivity_ci_upper")


@pytest.fixture(scope="module")
def wide() -> tuple[torch.Tensor, torch.Tensor]:
    """Twelve stocks (the five kinds of :func:`test_model.synthetic_panel` over three seeds, cut)."""
    parts = [synthetic_panel(seed=s, t_rows=400) for s in (3, 4, 5)]
    x = np.concatenate([p[0] for p in parts], axis=1)[:, :12]
    y = np.concatenate([p[1] for p in parts], axis=1)[:, :12]
    return torch.from_numpy(x), torch.from_numpy(y)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where NaN (the kernel's NaNs are all the same quiet NaN)."""
    return a.shape == b.shape and bool(torch.equal(a.nan_to_num(123.0), b.nan_to_num(123.0)))


def assert_same(got: QuadraticFit | SensitivityResult, want: QuadraticFit | SensitivityResult) -> None:
    fields = FIT_FIELDS if isinstance(want, QuadraticFit) else SENS_FIELDS
    for name in fields:
        assert same_bits(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize(("window", "min_obs"), [(60, 25), (0, 30)])
def test_a_streaming_loop_into_buffers_gives_the_bits_of_fresh_results(wide, window, min_obs):
    x, y = wide
    buffers = OutputBuffers()
    # Groups that grow, shrink and grow again: a buffer is reused from its start, then replaced.
    for c0, c1 in [(0, 3), (3, 5), (5, 6), (6, 12), (0, 2)]:
        xg, yg = x[:, c0:c1], y[:, c0:c1]
        want = quadratic_fit(xg, yg, window=window, min_obs=min_obs)
        got = quadratic_fit(xg, yg, window=window, min_obs=min_obs, out=buffers)
        assert_same(got, want)
        assert got.window == want.window
        assert got.min_obs == want.min_obs
        assert_same(daily_sensitivity(got, xg, out=buffers), daily_sensitivity(want, xg))


def fit_twice(
    wide: tuple[torch.Tensor, torch.Tensor], first_cols: slice, second_cols: slice
) -> tuple[QuadraticFit, torch.Tensor, int, QuadraticFit, OutputBuffers]:
    """Two fits into one ``OutputBuffers``: the first, a copy of its beta taken before the
    second call, the bytes held after it, the second fit and the buffers."""
    x, y = wide
    buffers = OutputBuffers()
    first = quadratic_fit(x[:, first_cols], y[:, first_cols], window=60, min_obs=25, out=buffers)
    first_beta = first.beta.clone()
    held = buffers.nbytes
    second = quadratic_fit(x[:, second_cols], y[:, second_cols], window=60, min_obs=25, out=buffers)
    return first, first_beta, held, second, buffers


def test_results_are_views_of_the_buffers_and_the_next_call_overwrites_them(wide):
    first, first_beta, held, second, buffers = fit_twice(wide, slice(0, 6), slice(6, 10))
    # A smaller call writes from the start of the same storage: no new memory.
    assert buffers.nbytes == held
    assert second.beta.untyped_storage().data_ptr() == first.beta.untyped_storage().data_ptr()
    # ... over the first call's results, as documented.
    assert not same_bits(first.beta, first_beta)


def test_a_larger_call_lets_the_old_buffer_go_and_the_old_results_stay_valid(wide):
    small, small_beta, held, large, buffers = fit_twice(wide, slice(0, 2), slice(None))
    assert buffers.nbytes > held
    assert large.beta.untyped_storage().data_ptr() != small.beta.untyped_storage().data_ptr()
    assert same_bits(small.beta, small_beta)  # the caller's reference keeps the old storage


def test_fit_and_sensitivity_share_one_instance_without_overwriting_each_other(wide):
    x, y = wide
    buffers = OutputBuffers()
    fit = quadratic_fit(x, y, window=60, min_obs=25, out=buffers)
    beta = fit.beta.clone()
    sens = daily_sensitivity(fit, x, out=buffers)
    assert same_bits(fit.beta, beta)
    assert_same(sens, daily_sensitivity(quadratic_fit(x, y, window=60, min_obs=25), x))
    assert "fit" in repr(buffers)
    assert "sensitivity" in repr(buffers)


def test_release_lets_the_memory_go():
    buffers = OutputBuffers()
    t = buffers.take("a", (3, 4), torch.float64, torch.device("cpu"))
    assert t.shape == (3, 4)
    assert t.is_contiguous()
    assert buffers.nbytes == 3 * 4 * 8
    buffers.release()
    assert buffers.nbytes == 0
    assert repr(buffers) == "OutputBuffers(empty; 0.0 MiB)"


def test_take_replaces_a_buffer_of_another_dtype():
    buffers = OutputBuffers()
    cpu = torch.device("cpu")
    floats = buffers.take("a", (8,), torch.float64, cpu)
    ints = buffers.take("a", (8,), torch.int64, cpu)
    assert ints.dtype == torch.int64
    assert ints.untyped_storage().data_ptr() != floats.untyped_storage().data_ptr()
    assert buffers.take("a", (2, 2), torch.int64, cpu).untyped_storage().data_ptr() == ints.data_ptr()


def test_empty_panels_with_buffers():
    buffers = OutputBuffers()
    empty = torch.empty((0, 3), dtype=torch.float64)
    fit = quadratic_fit(empty, empty, window=5, min_obs=4, out=buffers)
    assert fit.beta.shape == (0, 3)
    assert daily_sensitivity(fit, empty, out=buffers).sensitivity.shape == (0, 3)


@pytest.mark.parametrize("bad", ["yes", {}, object()])
def test_out_must_be_output_buffers(wide, bad):
    x, y = wide
    with pytest.raises(DataValidationError, match=r"out must be an OutputBuffers or None, got"):
        quadratic_fit(x, y, window=60, min_obs=25, out=bad)
    fit = quadratic_fit(x, y, window=60, min_obs=25)
    with pytest.raises(DataValidationError, match=r"out must be an OutputBuffers or None, got"):
        daily_sensitivity(fit, x, out=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_buffers_on_cuda_give_the_bits_of_fresh_results(wide):
    x, y = wide
    buffers = OutputBuffers()
    for c0, c1 in [(0, 8), (8, 12)]:
        xg, yg = x[:, c0:c1], y[:, c0:c1]
        want = quadratic_fit(xg, yg, window=60, min_obs=25, device="cuda")
        got = quadratic_fit(xg, yg, window=60, min_obs=25, device="cuda", out=buffers)
        assert got.beta.device.type == "cuda"
        assert_same(got, want)
        assert_same(daily_sensitivity(got, xg, out=buffers), daily_sensitivity(want, xg))
