"""Background jobs with progress, cancellation and a result: shared by the UI and the HTTP API.

A job runs a function ``fn(job)`` on its own thread. The function reports progress
with :meth:`Job.update`, checks :attr:`Job.cancel_event` (lorakit's engines take it as
``cancel``), and returns a JSON-serialisable result. Jobs that need the host's queue
lock take it inside ``fn``; while they wait they stay in state ``queued``.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import Cancelled, LorakitError

log = logging.getLogger("lorakit.jobs")

QUEUED, RUNNING, DONE, ERROR, CANCELLED = "queued", "running", "done", "error", "cancelled"
FINISHED = (DONE, ERROR, CANCELLED)


@dataclass
class Job:
    kind: str
    params: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = QUEUED
    progress: float = 0.0
    message: str = "waiting"
    result: Any = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def update(self, progress: float | None = None, message: str | None = None) -> None:
        """Report progress (0..1) and a short message; safe from any thread."""
        if progress is not None:
            self.progress = max(0.0, min(1.0, float(progress)))
        if message is not None:
            self.message = message

    def mark_running(self, message: str = "running") -> None:
        self.state = RUNNING
        self.started = time.time()
        self.message = message

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "state": self.state, "progress": round(self.progress, 4),
                "message": self.message, "result": self.result, "error": self.error, "params": self.params,
                "created": self.created, "started": self.started, "finished": self.finished}


class JobManager:
    """Start, list, cancel and wait for jobs. Finished jobs are kept (the newest ``keep``)."""

    def __init__(self, keep: int = 200):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.keep = keep

    def submit(self, kind: str, params: dict[str, Any], fn: Callable[[Job], Any]) -> Job:
        job = Job(kind=kind, params=params)
        with self._lock:
            self._jobs[job.id] = job
            self._trim()
        threading.Thread(target=self._run, args=(job, fn), name=f"lorakit-job-{job.id}", daemon=True).start()
        return job

    def _run(self, job: Job, fn: Callable[[Job], Any]) -> None:
        try:
            if job.cancelled:
                raise Cancelled("Cancelled before it started.")
            result = fn(job)
            if job.cancelled:
                raise Cancelled("Cancelled.")
            job.result = result
            job.state = DONE
            job.progress = 1.0
            job.message = "done"
        except Cancelled as e:
            job.state = CANCELLED
            job.message = "cancelled"
            job.error = str(e)
        except KeyboardInterrupt:  # pragma: no cover - only from signal handlers
            job.state = CANCELLED
            job.message = "cancelled"
        except LorakitError as e:
            job.state = ERROR
            job.message = "failed"
            job.error = str(e)
        except Exception as e:
            log.error("lorakit job %s (%s) failed unexpectedly:\n%s", job.id, job.kind, traceback.format_exc())
            job.state = ERROR
            job.message = "failed"
            job.error = f"Unexpected failure ({type(e).__name__}: {e}). The details are in the log."
        finally:
            job.finished = time.time()
            job._done.set()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def cancel(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is not None and job.state not in FINISHED:
            job.cancel_event.set()
            job.message = "cancelling"
        return job

    def _trim(self) -> None:
        done = [j for j in self._jobs.values() if j.state in FINISHED]
        for j in sorted(done, key=lambda j: j.created)[: max(0, len(self._jobs) - self.keep)]:
            del self._jobs[j.id]
