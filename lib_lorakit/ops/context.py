"""What an operation needs from where it runs: names or paths, folders, settings, jobs, a store.

Two contexts implement one interface:

- :class:`HostContext` — inside the WebUI or the standalone launcher: models are named as the
  host lists them (or by paths inside its model folders; anything else is refused), outputs go
  into the checkpoint folder, long work runs as a job under the host's queue lock.
- :class:`LocalContext` — the command line: models are file paths, outputs go where the user
  says, generation goes through a WebUI's HTTP API.

Operations (``lib_lorakit.ops.*``) take a context and a request and never ask which one it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..errors import Cancelled, LorakitError, RecipeError
from ..hosts import CHECKPOINT_EXTS, Host, ModelEntry, scan_models
from ..jobs import Job, JobManager, run_bounded
from ..safepath import NotFound, output_path, resolve_model

SETTING_SAVE_DTYPE = "lorakit_save_dtype"
SETTING_OUTPUT_SUBDIR = "lorakit_output_subdir"
SETTING_POOL = "lorakit_pool_webuis"  # other WebUIs that generate with this one (a pool)

Progress = Callable[[float, str], None]


class Context:
    """The interface shared by both contexts (see the module docstring)."""

    jobs: JobManager

    jobs_timeout: float | None = None  # seconds one job may run (None: jobs.DEFAULT_TIMEOUT)

    def __init__(self, jobs: JobManager | None = None):
        self.jobs = jobs or JobManager()
        self._store = None
        self._tours = None

    # --- models ------------------------------------------------------------------------------
    def resolve_checkpoint(self, value: str) -> str:
        raise NotImplementedError

    def resolve_lora(self, value: str) -> str:
        raise NotImplementedError

    def resolve_vae(self, value: str) -> str:
        raise NotImplementedError

    def output_path(self, name: str) -> str:
        raise NotImplementedError

    def written(self, path: str) -> str | None:
        """Tell the host a model file was written; return its name in the host's list."""
        return None

    def loras_changed(self) -> None:
        """Tell the host the LoRA folder changed (archive, restore, user metadata)."""

    def default_save_dtype(self) -> str:
        return "fp16"

    def engine_kwargs(self, device: str | None) -> dict[str, Any]:
        """Where bake/merge maths runs, how many threads, and the hash cache (see engineopts)."""
        return {"device": device or "auto"}

    # --- data -------------------------------------------------------------------------------------
    def data_dir(self) -> str:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        from ..settings import load

        return load(self.data_dir())

    def update_settings(self, changes: dict[str, Any], replace: tuple[str, ...] = ()) -> dict[str, Any]:
        from ..settings import update

        return update(self.data_dir(), changes, replace)

    def store(self):
        from ..eval.store import Store

        if self._store is None:
            self._store = Store(self.data_dir())
        return self._store

    def tournaments(self):
        from ..eval.tournament import Tournaments

        if self._tours is None:
            self._tours = Tournaments(self.store())
        return self._tours

    # --- generation and jobs ---------------------------------------------------------------------
    def backend(self, what: str):
        """The image generator for ``what`` (e.g. "run a strength grid")."""
        raise NotImplementedError

    def outputs_dir(self) -> str:
        raise NotImplementedError

    def submit(
        self,
        kind: str,
        params: dict[str, Any],
        work: Callable[[Progress, Any], Any],
        *,
        title: str | None = None,
        exclusive: bool = True,
        running: str = "starting",
    ) -> Job:
        """Run ``work(progress, cancel)`` as a job; ``exclusive`` work waits for the host's queue."""

        def run(job: Job) -> Any:
            job.mark_running(running)
            return run_bounded(job, lambda: work(job.update, job.cancel_event), self.jobs_timeout)

        return self.jobs.submit(kind, params, run)


class HostContext(Context):
    """Operations inside a host (the WebUI, or the standalone launcher on plain folders)."""

    def __init__(self, host: Host, jobs: JobManager | None = None):
        super().__init__(jobs)
        self.host = host
        if self.jobs.store is None:  # jobs survive a restart: finished ones are listed, unfinished ones interrupted
            try:
                self.jobs.attach(self.store())
            except NotImplementedError:  # a host without a data folder: jobs live in memory
                pass

    def checkpoints(self) -> list[ModelEntry]:
        return self.host.list_checkpoints()

    def loras(self) -> list[ModelEntry]:
        return self.host.list_loras()

    def vae_files(self) -> list[ModelEntry]:
        return scan_models(self.host.vae_dirs(), CHECKPOINT_EXTS)

    def resolve_checkpoint(self, value: str) -> str:
        return resolve_model(value, self.checkpoints(), self.host.checkpoint_dirs(), "checkpoint")

    def resolve_lora(self, value: str) -> str:
        return resolve_model(value, self.loras(), self.host.lora_dirs(), "LoRA")

    def resolve_vae(self, value: str) -> str:
        roots = self.host.vae_dirs() + self.host.checkpoint_dirs()
        return resolve_model(value, self.vae_files() + self.checkpoints(), roots, "VAE")

    def lora_roots(self) -> list[str]:
        return self.host.lora_dirs()

    def output_path(self, name: str) -> str:
        subdir = str(self.host.setting(SETTING_OUTPUT_SUBDIR, "") or "").strip().strip("/\\")
        return output_path(name, self.host.checkpoint_dirs()[0], subdir)

    def written(self, path: str) -> str | None:
        self.host.refresh_checkpoints()
        for e in self.checkpoints():
            if os.path.realpath(e.path) == os.path.realpath(path):
                return e.name
        return None

    def loras_changed(self) -> None:
        self.host.refresh_loras()

    def default_save_dtype(self) -> str:
        return str(self.host.setting(SETTING_SAVE_DTYPE, "fp16") or "fp16")

    def engine_kwargs(self, device: str | None) -> dict[str, Any]:
        from ..engineopts import host_kwargs

        return host_kwargs(self.host, device)

    def data_dir(self) -> str:
        return self.host.data_dir()

    def outputs_dir(self) -> str:
        return self.host.outputs_dir()

    def archive_dir(self) -> str:
        roots = self.host.lora_dirs()
        return os.path.join(os.path.dirname(os.path.realpath(roots[0])), "Lora-archive")

    def backend(self, what: str, fix: str = ""):
        from ..gen.backend import GenerationUnavailable, HostBackend

        if self.host.flavour == "standalone":
            raise GenerationUnavailable(
                f"The standalone launcher cannot make images, so it cannot {what}.",
                fix=fix or "Run it in the WebUI, or from the command line with a WebUI URL.",
            )
        from ..gen.pool import http_pool, parse_urls

        urls = parse_urls(str(self.host.setting(SETTING_POOL, "") or ""))
        if urls:  # this WebUI and the others of the Settings field: a pool
            return http_pool(urls, first=HostBackend(self.host))
        return HostBackend(self.host)

    def progress_for(self, job: Job, host_progress: bool = False) -> Progress:
        """A job's progress callback; the WebUI's own Interrupt button cancels the job too."""

        def progress(frac: float, msg: str) -> None:
            job.update(frac, msg)
            if host_progress:
                self.host.job_progress(frac, msg)
            if self.host.interrupted():
                job.cancel_event.set()

        return progress

    def submit(
        self,
        kind: str,
        params: dict[str, Any],
        work: Callable[[Progress, Any], Any],
        *,
        title: str | None = None,
        exclusive: bool = True,
        running: str = "starting",
    ) -> Job:
        def run(job: Job) -> Any:
            # run_bounded: a cancel answers within a second and a stuck job times out, in every phase, so the
            # queue lock below is always given back
            if not exclusive:
                job.mark_running(running)
                return run_bounded(job, lambda: work(self.progress_for(job), job.cancel_event), self.jobs_timeout)
            with self.host.queue_lock():
                if job.cancelled:  # cancelled while it waited for the queue (answered at once, see JobManager)
                    raise Cancelled("Cancelled before it started.")
                job.mark_running(running)
                self.host.job_begin(title or f"lorakit: {kind}")
                try:
                    return run_bounded(
                        job,
                        lambda: work(self.progress_for(job, host_progress=True), job.cancel_event),
                        self.jobs_timeout,
                    )
                finally:
                    self.host.job_end()

        return self.jobs.submit(kind, params, run)


class LocalContext(Context):
    """Operations from the command line: models are file paths; generation goes through a WebUI URL."""

    def __init__(
        self,
        data_dir: str | None = None,
        *,
        webui: str | list[str] | None = None,
        api_auth: str | list[str] | None = None,
        batch_size: int | None = None,
        outputs_dir: str | None = None,
        models_dir: str | None = None,
        jobs: JobManager | None = None,
        engine: dict[str, Any] | None = None,
    ):
        super().__init__(jobs)
        self.engine = dict(engine or {})  # device, workers, hash_cache from the command line
        self._data = data_dir
        self.webui, self.api_auth = webui, api_auth
        self.batch_size = batch_size
        self._outputs = outputs_dir
        self.models_dir = models_dir

    def _file(self, value: str, what: str) -> str:
        v = (value or "").strip()
        if not v:
            raise RecipeError(f"No {what} given.")
        if os.path.isfile(v):
            return os.path.abspath(v)
        if self.models_dir and what == "checkpoint" and not os.path.isabs(v):
            for cand in (os.path.join(self.models_dir, v), os.path.join(self.models_dir, v + ".safetensors")):
                if os.path.isfile(cand):
                    return os.path.abspath(cand)
        if os.path.isdir(v):
            raise RecipeError(f"The {what} {v} is a folder, not a file.", fix="Give the model file's path.")
        raise NotFound(f"{v}: file not found (the {what}).", fix="Check the path and the file name.")

    def resolve_checkpoint(self, value: str) -> str:
        return self._file(value, "checkpoint")

    def resolve_lora(self, value: str) -> str:
        return self._file(value, "LoRA")

    def resolve_vae(self, value: str) -> str:
        return self._file(value, "VAE")

    def output_path(self, name: str) -> str:
        v = (name or "").strip()
        if not v:
            raise RecipeError("No output file given.", fix="Name the output .safetensors file.")
        if self.models_dir and not os.path.isabs(v) and os.sep not in v and "/" not in v:
            v = os.path.join(self.models_dir, v if v.lower().endswith(".safetensors") else v + ".safetensors")
        return os.path.abspath(v)

    def engine_kwargs(self, device: str | None) -> dict[str, Any]:
        out = dict(self.engine)
        if device:
            out["device"] = device
        return out

    def data_dir(self) -> str:
        if not self._data:
            raise RecipeError("No data folder given.", fix="Name lorakit's data folder (where lorakit.db lives).")
        return self._data

    def settings(self) -> dict[str, Any]:
        from ..settings import load

        return load(self._data) if self._data else load(None)

    def outputs_dir(self) -> str:
        return self._outputs or "lorakit-runs"

    def backend(self, what: str, fix: str = ""):
        from ..gen.backend import GenerationUnavailable
        from ..gen.pool import http_pool

        urls = [self.webui] if isinstance(self.webui, str) else list(self.webui or [])
        if not urls:
            raise GenerationUnavailable(
                f"No WebUI to generate with, so lorakit cannot {what}.",
                fix="Give the URL of a WebUI started with --api.",
            )
        return http_pool(urls, self.api_auth, batch_size=self.batch_size)  # one WebUI is a pool of one


def require(condition: bool, message: str, fix: str | None = None, cls: type[LorakitError] = RecipeError) -> None:
    """Raise ``cls(message)`` unless ``condition`` holds."""
    if not condition:
        raise cls(message, fix=fix)
