"""Serve the deployments declared in ``prefect.yaml`` from one process (no work pool).

``prefect.yaml`` stays the single source of truth for names, schedules, parameters and
concurrency limits; ``sensitivity serve`` turns each entry into a runner deployment of the
flow at its entrypoint and serves them all with :func:`prefect.serve`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint

from sensitivity.errors import ConfigError


def read_deployments(root: Path) -> list[dict[str, Any]]:
    """The deployment entries of ``<root>/prefect.yaml``."""
    path = root / "prefect.yaml"
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; run from the project folder") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    deployments = spec.get("deployments") or []
    if not isinstance(deployments, list) or not deployments:
        raise ConfigError(f"{path} declares no deployments")
    return deployments


def build_deployments(root: Path, names: Sequence[str] | None = None, *, schedules: bool = True) -> list[Any]:
    """Runner deployments for the entries of prefect.yaml (all, or those named); with
    ``schedules=False`` none gets its cron schedules (runs start only when triggered)."""
    entries = read_deployments(root)
    known = [str(e.get("name")) for e in entries]
    if names:
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ConfigError(
                f"no deployment named {', '.join(unknown)} in prefect.yaml; known: {', '.join(known)}"
            )
        entries = [e for e in entries if e.get("name") in names]
    out = []
    for entry in entries:
        path, func = str(entry["entrypoint"]).split(":")
        flow = load_flow_from_entrypoint(f"{root / path}:{func}", use_placeholder_flow=False)
        crons = [
            CronSchedule(cron=s["cron"], timezone=s.get("timezone", "UTC"))
            for s in (entry.get("schedules") or [] if schedules else [])
            if s.get("cron") and s.get("active", True)
        ]
        limit = entry.get("concurrency_limit") or None
        concurrency = (
            ConcurrencyLimitConfig(
                limit=int(limit["limit"]),
                collision_strategy=ConcurrencyLimitStrategy(limit.get("collision_strategy", "ENQUEUE")),
            )
            if isinstance(limit, dict)
            else limit
        )
        out.append(
            flow.to_deployment(
                name=str(entry["name"]),
                description=entry.get("description"),
                schedules=crons or None,
                parameters=entry.get("parameters") or {},
                tags=entry.get("tags") or [],
                concurrency_limit=concurrency,
                enforce_parameter_schema=bool(entry.get("enforce_parameter_schema", True)),
            )
        )
    return out


def serve_deployments(
    root: Path, names: Sequence[str] | None = None, limit: int = 1, *, schedules: bool = True
) -> None:
    """Serve the deployments until interrupted (without their schedules if ``schedules`` is False)."""
    serve(*build_deployments(root, names, schedules=schedules), limit=limit)
