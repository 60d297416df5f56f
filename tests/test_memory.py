"""Arrow's memory pool in pipeline processes (:mod:`sensitivity.memory`).

Each check runs in a fresh interpreter: the pool is process state, chosen once.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pytest

from sensitivity.memory import POOL_VARIABLE


def _python(code: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k != POOL_VARIABLE}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "Unsupported backend" not in done.stderr, done.stderr
    return done.stdout.split()


def _has_jemalloc() -> bool:
    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        return False
    return True


needs_jemalloc = pytest.mark.skipif(not _has_jemalloc(), reason="this pyarrow was built without jemalloc")

_REPORT = (
    "import os, pyarrow as pa\n"
    f"print(pa.default_memory_pool().backend_name, os.environ.get({POOL_VARIABLE!r}, '-'))"
)


def test_importing_the_library_leaves_arrows_pool_alone() -> None:
    (default, _) = _python(_REPORT)
    assert _python("import sensitivity, sensitivity.store, sensitivity.pipeline\n" + _REPORT) == [
        default,
        "-",
    ]


@needs_jemalloc
def test_use_jemalloc_makes_it_the_pool_of_this_process_only() -> None:
    (default, _) = _python(_REPORT)
    code = (
        "import subprocess, sys\n"
        "from sensitivity.memory import use_jemalloc\n"
        "print(use_jemalloc())\n" + _REPORT + "\n"
        f"print(subprocess.run([sys.executable, '-c', {_REPORT!r}], capture_output=True, text=True,"
        " check=True).stdout)\n"
        "print(use_jemalloc())\n"  # a second call changes nothing
    )
    assert _python(code) == ["jemalloc", "jemalloc", "-", default, "-", "jemalloc"]


def test_a_pool_the_user_named_is_kept() -> None:
    code = "from sensitivity.memory import use_jemalloc\nprint(use_jemalloc())\n" + _REPORT
    assert _python(code, **{POOL_VARIABLE: "system"}) == ["system", "system", "system"]


class _Chosen(Exception):
    """Raised by the patched ``use_jemalloc``: the run stops right there."""


def test_sensitivity_run_chooses_the_pool_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import sensitivity.cli as cli

    calls: list[str] = []

    def chosen() -> str:
        calls.append("use_jemalloc")
        raise _Chosen

    monkeypatch.setattr(cli, "use_jemalloc", chosen)
    monkeypatch.setattr(cli, "_prestart_workers", lambda cfg: calls.append("prestart"))
    result = CliRunner().invoke(cli.app, ["run", "--config", "config/sample.toml"])
    assert isinstance(result.exception, _Chosen)
    assert calls == ["use_jemalloc"]


def test_the_flow_chooses_the_pool_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.pipeline as flow_module

    def chosen() -> str:
        raise _Chosen

    monkeypatch.setattr(flow_module, "use_jemalloc", chosen)
    with pytest.raises(_Chosen):
        flow_module.stock_sensitivity.fn(config="config/sample.toml")
