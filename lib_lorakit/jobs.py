"""Background jobs with progress, cancellation and a result: shared by the UI and the HTTP API.

A job runs a function ``fn(job)`` on its own thread. The function reports progress
with :meth:`Job.update`, checks :attr:`Job.cancel_event` (lorakit's engines take it as
``cancel``), and returns a JSON-serialisable result. Jobs that need the host's queue
lock take it inside ``fn``; while they wait they stay in state ``queued``.
"""

from __future__ import annotations

import logging
import os
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
INTERRUPTED = "interrupted"  # queued or running when the server stopped (found so at the next start)
FINISHED = (DONE, ERROR, CANCELLED, INTERRUPTED)

# One job may run this long (seconds) before it is cancelled and reported as failed, so that a stuck job
# never holds the queue: LORAKIT_JOB_TIMEOUT, default 6 hours.
DEFAULT_TIMEOUT = float(os.environ.get("LORAKIT_JOB_TIMEOUT", 6 * 3600))
CANCEL_GRACE = 0.5  # seconds a cancelled job's work gets to stop by itself before the job is let go


class JobTimeout(LorakitError):
    """A job ran past its time limit."""


def run_bounded(job: Job, work: Callable[[], Any], timeout: float | None = None) -> Any:
    """Run ``work()`` for ``job`` on a helper thread and return its result — or give it up when the job is
    cancelled (after :data:`CANCEL_GRACE` seconds; raises Cancelled) or runs past ``timeout`` (raises
    JobTimeout, and cancels it). The caller's locks (the host's queue) are then released even if the work is
    stuck: it goes on alone, told to stop, on a daemon thread; what it writes is a temp file, never an output.
    """
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as e:  # handed to the job's thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name=f"lorakit-work-{job.id}", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not done.wait(0.05):
        if job.cancel_event.is_set():
            if done.wait(CANCEL_GRACE):
                break
            raise Cancelled("Cancelled; the work is told to stop and removes its partial output.")
        if time.monotonic() > deadline:
            job.cancel_event.set()
            raise JobTimeout(
                f"The job ran longer than its time limit ({timeout:g} s) and was stopped.",
                fix="Raise the limit (LORAKIT_JOB_TIMEOUT, seconds) if the work is that long, or "
                "check the server log for what it was waiting on.",
            )
    if "error" in box:
        raise box["error"]
    return box.get("result")


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
    _on_change: Callable[[Job], None] | None = field(default=None, repr=False)

    def update(self, progress: float | None = None, message: str | None = None) -> None:
        """Report progress (0..1) and a short message; safe from any thread."""
        if progress is not None:
            self.progress = max(0.0, min(1.0, float(progress)))
        if message is not None:
            self.message = message

    def mark_running(self, message: str = "running") -> None:
        if self.cancel_event.is_set():
            raise Cancelled("Cancelled before it started.")
        self.state = RUNNING
        self.started = time.time()
        self.message = message
        if self._on_change is not None:
            self._on_change(self)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "progress": round(self.progress, 4),
            "message": self.message,
            "result": self.result,
            "error": self.error,
            "params": self.params,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        }


class JobManager:
    """Start, list, cancel and wait for jobs. Finished jobs are kept (the newest ``keep``)."""

    def __init__(self, keep: int = 200):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.keep = keep
        self.store = None

    def attach(self, store) -> int:
        """Keep the jobs in ``store`` (lorakit's SQLite store): the jobs of earlier runs are listed again, and those
        left queued or running (the server stopped) are marked interrupted. Returns how many were."""
        self.store = store
        try:
            n = store.interrupt_jobs(
                "The server stopped before this job finished; nothing was written. Start it again."
            )
            for row in reversed(store.jobs(self.keep)):
                job = Job(
                    kind=row["kind"],
                    params=row["params"],
                    id=row["id"],
                    state=row["state"],
                    progress=row["progress"],
                    message=row["message"],
                    result=row["result"],
                    error=row["error"],
                    created=row["created"],
                    started=row["started"],
                    finished=row["finished"],
                )
                job._done.set()
                self._jobs.setdefault(job.id, job)
        except Exception:  # a broken store must not stop the server; jobs then live in memory only
            log.error("lorakit: cannot read the stored jobs:\n%s", traceback.format_exc())
            self.store = None
            return 0
        if n:
            log.warning("lorakit: %d job(s) were queued or running when the server stopped; marked interrupted", n)
        return n

    def _persist(self, job: Job) -> None:
        if self.store is None:
            return
        try:
            self.store.save_job(job.as_dict())
        except Exception:
            log.error("lorakit: cannot store job %s:\n%s", job.id, traceback.format_exc())

    def submit(self, kind: str, params: dict[str, Any], fn: Callable[[Job], Any]) -> Job:
        job = Job(kind=kind, params=params, _on_change=self._persist)
        with self._lock:
            self._jobs[job.id] = job
            self._trim()
        self._persist(job)
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
        except JobTimeout as e:
            log.error("lorakit job %s (%s) timed out", job.id, job.kind)
            job.state = ERROR
            job.message = "timed out"
            job.error = str(e)
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
            self._persist(job)
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
            if job.state == QUEUED:  # waiting for the queue: nothing started, so it is cancelled now
                job.state, job.message, job.error = CANCELLED, "cancelled", "Cancelled before it started."
                job.finished = time.time()
                self._persist(job)
                job._done.set()
        return job

    def _trim(self) -> None:
        done = [j for j in self._jobs.values() if j.state in FINISHED]
        for j in sorted(done, key=lambda j: j.created)[: max(0, len(self._jobs) - self.keep)]:
            del self._jobs[j.id]
