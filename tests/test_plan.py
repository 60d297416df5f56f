"""How a run splits its work (sensitivity.plan): pure rules, checked without Prefect."""

from __future__ import annotations

from pathlib import Path

import pytest

from sensitivity import plan
from sensitivity.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("sections", "workers", "cpus", "expected"),
    [
        (40, None, 2, 1),  # one per spare CPU ...
        (40, None, 16, 5),  # ... and one per SECTIONS_PER_WORKER sections
        (200, None, 64, plan.MAX_SECTION_WORKERS),  # never more than the cap
        (7, None, 16, 0),  # too few sections to pay for a worker's start
        (40, None, 1, 0),  # no spare CPU
        (40, 0, 16, 0),  # 0: the caller draws everything
        (3, 8, 2, 3),  # asked for: as many as asked, never more than the sections
    ],
)
def test_section_workers(sections: int, workers: int | None, cpus: int, expected: int) -> None:
    assert plan.section_workers(sections, workers, cpus=cpus) == expected


def test_charted_sections_caps_each_group_at_the_chart_limit() -> None:
    assert plan.charted_sections([500]) == plan.CHART_LIMIT
    assert plan.charted_sections([12, 500, 3], chart_limit=10) == 10 + 10 + 3
    assert plan.charted_sections([]) == 0


def test_fetch_processes_take_the_cpus_given(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "config" / "sample.toml", {"source": "files", "source_path": str(tmp_path)})
    symbols = [f"S{i:04d}" for i in range(501)]
    batches = plan.fetch_batches(cfg, symbols)
    concurrency = cfg.source.concurrency
    assert plan.fetch_processes(cfg, batches, cpus=2) == min(2, concurrency, len(batches))
    assert plan.fetch_processes(cfg, batches, cpus=1) == 0


def test_the_worker_functions_exist() -> None:
    from sensitivity.process_pool import _resolve

    assert callable(_resolve(plan.FETCH_WORKER))
    assert callable(_resolve(plan.SECTION_WORKER))
