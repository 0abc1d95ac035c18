"""The cron-scheduled cohort deployment really creates flow runs (guards the SQLAlchemy 2.1 trap)."""

from __future__ import annotations

import asyncio
import time

import pytest


def test_cron_deployment_creates_scheduled_runs(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.serve import cohort_deployment

    dep_id = cohort_deployment("/data/bids", "/data/out", cron="* * * * *", name="test-every-minute").apply()

    async def runs():
        async with get_client() as c:
            return await c.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))

    deadline = time.monotonic() + 90
    found = []
    while time.monotonic() < deadline and not found:
        found = asyncio.run(runs())
        time.sleep(1)
    assert found, "the scheduler created no run for the cron deployment"
    assert {r.state_name for r in found} == {"Scheduled"}
    assert all(r.parameters["bids_dir"] == "/data/bids" for r in found)
