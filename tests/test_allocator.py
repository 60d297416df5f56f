"""Arrow's allocator is told not to back its arenas with transparent huge pages.

Importing ``sensitivity`` sets ``MIMALLOC_ALLOW_THP=0`` (unless the user set it) before pandas
or pyarrow loads, so mimalloc reads it when Arrow starts: checked in fresh interpreters, with
mimalloc's own report of its options (``MIMALLOC_VERBOSE=1``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _mimalloc_options(code: str, **env: str) -> tuple[str, str]:
    """(stdout, mimalloc's report on stderr) of ``code`` in a fresh interpreter."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MIMALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**environ, "MIMALLOC_VERBOSE": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    if "option 'allow_thp'" not in done.stderr:
        pytest.skip("this pyarrow's allocator is not a mimalloc with the allow_thp option")
    return done.stdout, done.stderr


def test_importing_sensitivity_first_turns_huge_pages_off_for_arrow() -> None:
    code = "import os, sensitivity, pandas, pyarrow; print(os.environ['MIMALLOC_ALLOW_THP'])"
    out, report = _mimalloc_options(code)
    assert out.strip() == "0"
    assert "option 'allow_thp': 0" in report


def test_a_value_the_user_set_is_kept() -> None:
    code = "import os, sensitivity, pyarrow; print(os.environ['MIMALLOC_ALLOW_THP'])"
    out, report = _mimalloc_options(code, MIMALLOC_ALLOW_THP="1")
    assert out.strip() == "1"
    assert "option 'allow_thp': 1" in report
