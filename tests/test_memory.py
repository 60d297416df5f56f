"""Arrow's memory pool in pipeline processes (:mod:`sensitivity.memory`).

Each check runs in a fresh interpreter: the pool is process state, chosen once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
def test_use_jemalloc_makes_it_the_pool_here_and_in_processes_started_after() -> None:
    code = (
        "import subprocess, sys\n"
        "from sensitivity.memory import use_jemalloc\n"
        "print(use_jemalloc())\n" + _REPORT + "\n"
        f"print(subprocess.run([sys.executable, '-c', {_REPORT!r}], capture_output=True, text=True,"
        " check=True).stdout)\n"
        "print(use_jemalloc())\n"  # a second call changes nothing
    )
    assert _python(code) == ["jemalloc", "jemalloc", "jemalloc", "jemalloc", "jemalloc", "jemalloc"]


def test_a_pool_the_user_named_is_kept() -> None:
    code = "from sensitivity.memory import use_jemalloc\nprint(use_jemalloc())\n" + _REPORT
    assert _python(code, **{POOL_VARIABLE: "system"}) == ["system", "system", "system"]


@needs_jemalloc
def test_the_worker_processes_of_a_run_use_it(tmp_path: Path) -> None:
    """A worker a :class:`ProcessPool` starts after ``use_jemalloc`` allocates from jemalloc."""
    (tmp_path / "pool_backend.py").write_text(
        "import pyarrow as pa\n\ndef backend():\n    return pa.default_memory_pool().backend_name\n"
    )
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from sensitivity.memory import use_jemalloc\n"
        "from sensitivity.process_pool import ProcessPool\n"
        "use_jemalloc()\n"
        "with ProcessPool('pool_backend:backend', 1) as pool:\n"
        "    print(pool.call(lambda: 'the-caller'))\n"
    )
    assert _python(code) == ["jemalloc"]
