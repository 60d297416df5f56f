"""Importing the fit's and the report's modules ahead, on a thread (:mod:`sensitivity.preload`).

The imports are process state: each check runs in a fresh interpreter.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest

from sensitivity.preload import STEP_MODULES


def _python(code: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True
    )
    return done.stdout.split()


def test_the_thread_imports_torch_and_matplotlib_and_a_second_call_does_nothing() -> None:
    code = (
        "import sys\n"
        "import flows.pipeline\n"  # what a deployment run's process has loaded when the flow starts
        "from sensitivity.preload import STEP_MODULES, import_steps_in_background\n"
        "print(any(m in sys.modules for m in ('torch', 'matplotlib', *STEP_MODULES)))\n"
        "thread = import_steps_in_background()\n"
        "print(thread.daemon)\n"
        "thread.join(120)\n"
        "print(all(m in sys.modules for m in ('torch', 'matplotlib', *STEP_MODULES)))\n"
        "print(import_steps_in_background())\n"
    )
    assert _python(code) == ["False", "True", "True", "None"]


def test_a_step_importing_meanwhile_gets_the_whole_module() -> None:
    code = (
        "from sensitivity.preload import import_steps_in_background\n"
        "thread = import_steps_in_background()\n"
        "from sensitivity.api import quadratic_sensitivity\n"  # while the thread may hold the lock
        "from sensitivity.report import render_report\n"
        "thread.join(120)\n"
        "print(callable(quadratic_sensitivity), callable(render_report))\n"
    )
    assert _python(code) == ["True", "True"]


def test_a_failing_import_is_left_to_the_step() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # importing torch now raises ImportError
        "from sensitivity.preload import import_steps_in_background\n"
        "import_steps_in_background().join(120)\n"
        "print('sensitivity.api' in sys.modules)\n"
        "try:\n"
        "    import sensitivity.api\n"
        "except ImportError:\n"
        "    print('raised')\n"
    )
    assert _python(code) == ["False", "raised"]


class _Started(Exception):
    """Raised by the patched ``import_steps_in_background``: the run stops right there."""


def test_the_flow_starts_the_imports_once_the_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.pipeline as flow_module
    from sensitivity.errors import ConfigError

    def started() -> None:
        raise _Started

    monkeypatch.setattr(flow_module, "import_steps_in_background", started)
    monkeypatch.setattr(flow_module, "use_jemalloc", lambda: "jemalloc")
    monkeypatch.setattr(flow_module, "get_run_logger", lambda: logging.getLogger("test-preload"))
    with pytest.raises(ConfigError):
        flow_module.stock_sensitivity.fn(config="config/sample.toml", window=-1)
    with pytest.raises(_Started):
        flow_module.stock_sensitivity.fn(config="config/sample.toml")


def test_the_step_modules_are_the_ones_the_fit_and_the_report_use() -> None:
    assert STEP_MODULES == ("sensitivity.api", "sensitivity.report")


@pytest.mark.parametrize("engine", [True, False], ids=["prefect-engine", "other"])
def test_a_flow_run_process_freezes_what_it_holds_once_the_steps_are_imported(engine: bool) -> None:
    """In a process Prefect started for a flow run (main module ``prefect.engine``) the thread
    imports with the collector paused and freezes what the process holds after; anywhere else
    the collector is left as it was."""
    code = (
        "import gc, sys, types\n"
        + (
            "sys.modules['__main__'].__spec__ = types.SimpleNamespace(name='prefect.engine')\n"
            if engine
            else ""
        )
        + "import flows.pipeline\n"
        "from sensitivity.preload import engine_process, import_steps_in_background\n"
        "print(engine_process(), gc.get_freeze_count())\n"
        "import_steps_in_background().join(120)\n"
        "print(gc.isenabled(), gc.get_freeze_count() > 100_000)\n"
    )
    assert _python(code) == [str(engine), "0", "True", str(engine)]


@pytest.mark.parametrize("engine", [True, False], ids=["flow-run-process", "other"])
def test_a_flow_run_process_warms_the_workers_zygote_when_it_loads_the_flow(engine: bool) -> None:
    """In a process Prefect started for one flow run, loading the flow starts the zygote the
    fetch's and the report's workers are forked from, importing their modules ahead; a
    process that only imports the flow (the CLI, ``serve``, a test) starts nothing."""
    code = (
        "import sys, types\n"
        + (
            "sys.modules['__main__'].__spec__ = types.SimpleNamespace(name='prefect.engine')\n"
            if engine
            else ""
        )
        + "import flows.pipeline\n"
        "from sensitivity import process_pool\n"
        "print(len(process_pool._ZYGOTES))\n"
        "if process_pool._ZYGOTES:\n"
        "    pool = process_pool.ProcessPool('sys:modules.__contains__', 1)\n"
        "    print(pool.call(lambda name: None, 'matplotlib'), pool.call(lambda name: None, 'pandas'))\n"
        "    pool.close()\n"
    )
    linux = sys.platform == "linux"
    expected = ["1", "True", "True"] if engine and linux else ["0"]
    assert _python(code) == expected


def _spawned_engine_check(queue: Any) -> None:
    from sensitivity.preload import engine_process

    queue.put(engine_process())


@pytest.mark.parametrize("served", [True, False], ids=["served-deployment", "other-child"])
def test_a_child_a_runner_spawns_for_a_deployment_is_a_flow_run_process(
    served: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runner serving deployments (``sensitivity serve``) runs each flow run in a spawned
    child with ``PREFECT__DEPLOYMENT_NAME`` set; another child is not taken for one."""
    import multiprocessing

    from sensitivity.preload import engine_process

    if served:
        monkeypatch.setenv("PREFECT__DEPLOYMENT_NAME", "daily")
    else:
        monkeypatch.delenv("PREFECT__DEPLOYMENT_NAME", raising=False)
    assert engine_process() is False  # (this process is no child)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_spawned_engine_check, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=120) is served
    finally:
        child.join(60)
