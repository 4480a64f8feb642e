"""Jobs: list, look at, cancel."""

from __future__ import annotations

from typing import Any

from ..errors import RecipeError
from .context import Context


class JobNotFound(RecipeError):
    http_status = 404


def jobs(ctx: Context) -> list[dict[str, Any]]:
    return [j.as_dict() for j in ctx.jobs.list()]


def job(ctx: Context, job_id: str) -> dict[str, Any]:
    j = ctx.jobs.get(job_id)
    if j is None:
        raise JobNotFound(f"No job {job_id!r}.", fix="List the jobs to see their ids.")
    return j.as_dict()


def cancel(ctx: Context, job_id: str, wait: float = 10.0) -> dict[str, Any]:
    """Cancel a job (its partial output is removed); wait up to ``wait`` seconds for it to stop."""
    j = ctx.jobs.cancel(job_id)
    if j is None:
        raise JobNotFound(f"No job {job_id!r}.", fix="List the jobs to see their ids.")
    j.wait(max(0.0, min(float(wait), 60.0)))
    return j.as_dict()
