"""`prefect deployment run` against a real Prefect server on 127.0.0.1, served by `sensitivity serve`.

This is the path the people who run the pipeline use: a server, one process serving the
deployments of prefect.yaml, and runs triggered from the command line with --param.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict[str, object]) -> object:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real `prefect server start` with its own PREFECT_HOME, and `sensitivity serve` beside it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # Every run here uses the bundled sample; should one ever reach the Yahoo source
        # anyway, its requests go to a closed port on this machine, never to the internet.
        "SENSITIVITY_YAHOO_BASE_URL": "http://127.0.0.1:9",
    }
    logs = home / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                cwd=home,
                stdout=(logs / "server.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if _get(f"{api}/health") is True:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or procs[0].poll() is not None:
                pytest.fail("prefect server did not start:\n" + (logs / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        procs.append(
            subprocess.Popen(
                # Without the daily cron: a scheduled run would fetch from Yahoo (the network)
                # into the project's data/ folder if the suite ran at 18:30 New York time.
                [str(BIN / "sensitivity"), "serve", "--no-schedules"],
                env=env,
                cwd=ROOT,
                stdout=(logs / "serve.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + 120
        while True:
            names = {d["name"] for d in _post(f"{api}/deployments/filter", {})}  # type: ignore[attr-defined]
            if {"daily", "backfill"} <= names:
                break
            if time.monotonic() > deadline or procs[1].poll() is not None:
                pytest.fail(
                    "sensitivity serve did not register:\n" + (logs / "serve.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        yield {
            "api": api,
            "home": str(home),
            "logs": str(logs),
            **{k: v for k, v in env.items() if k.startswith("PREFECT")},
        }
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _deployment_run(
    server: dict[str, str], *params: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **{k: v for k, v in server.items() if k.startswith("PREFECT")}}
    args = [str(BIN / "prefect"), "deployment", "run", "stock-sensitivity/daily", "--watch"]
    for p in params:
        args += ["--param", p]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def _flow_run(server: dict[str, str], proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """The flow run that `prefect deployment run` created (it prints its UUID)."""
    found = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    assert found, proc.stdout + proc.stderr
    return _get(f"{server['api']}/flow_runs/{found.group(1)}")  # type: ignore[return-value]


def test_deployment_run_with_params_writes_outputs(server: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = _deployment_run(
        server,
        'tickers=["KO", "MSFT"]',
        "source=sample",
        "config=config/sample.toml",
        "start=2017-06-01",
        f"data_dir={json.dumps(str(data))}",
    )
    run = _flow_run(server, proc)
    assert proc.returncode == 0, (
        proc.stdout + proc.stderr + Path(server["logs"], "serve.log").read_text()[-4000:]
    )
    assert run["state_type"] == "COMPLETED"
    assert run["parameters"]["tickers"] == ["KO", "MSFT"]  # type: ignore[index]
    table = pd.read_parquet(data / "reports" / "sensitivity")
    assert set(table["ticker"]) == {"KO", "MSFT"}
    assert (data / "reports" / "daily" / "2019-02-22" / "report.html").is_file()


def test_deployment_run_bad_param_fails_with_clear_message(server: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = _deployment_run(
        server, "window=-5", "source=sample", "config=config/sample.toml", f"data_dir={json.dumps(str(data))}"
    )
    run = _flow_run(server, proc)
    assert proc.returncode != 0
    assert run["state_type"] == "FAILED"
    assert "model.window must be >= 0, got -5" in str(run["state"]["message"])  # type: ignore[index]
    assert not data.exists()


def test_serving_without_schedules_drops_only_the_cron() -> None:
    """`sensitivity serve --no-schedules` (used above) must keep everything else of prefect.yaml."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deployments_under_test", ROOT / "flows" / "deployments.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scheduled = {d.name: d for d in module.build_deployments(ROOT)}
    bare = {d.name: d for d in module.build_deployments(ROOT, schedules=False)}
    assert [s.schedule.cron for s in scheduled["daily"].schedules] == ["30 18 * * 1-5"]
    assert not bare["daily"].schedules
    assert not bare["backfill"].schedules
    for name, d in bare.items():
        assert d.parameters == scheduled[name].parameters
        assert d.concurrency_limit == scheduled[name].concurrency_limit
