"""lorakit's operations for a host: what the tab and the HTTP API both call.

Requests carry names from the host's lists (or paths inside its model folders); they
are resolved and validated synchronously, so the API can answer 400/403/404 at once,
then the work runs as a :class:`~lib_lorakit.jobs.Job` under the host's queue lock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .engineopts import host_kwargs
from .errors import RecipeError
from .hosts import Host, ModelEntry
from .jobs import Job, JobManager
from .prompt import parse_tags
from .safepath import output_path, resolve_model

SETTING_SAVE_DTYPE = "lorakit_save_dtype"
SETTING_OUTPUT_SUBDIR = "lorakit_output_subdir"


@dataclass
class BakeLora:
    name: str
    strength: float = 1.0
    te_strength: float | None = None
    blocks: str | None = None


@dataclass
class MergeModel:
    name: str
    weight: float = 1.0


@dataclass
class MergeRequest:
    models: list[MergeModel]
    output: str
    method: str = "weighted"
    base: str | None = None
    blocks: str | None = None
    vae_from: str | int | None = None  # model number, or a VAE file name (VAE or checkpoint folders)
    te_from: int | None = None
    normalize: bool = True
    density: float = 0.2
    drop: float = 0.5
    seed: int = 0
    scale: float = 1.0
    save_dtype: str | None = None
    overwrite: bool = False
    device: str | None = None  # auto, cpu, cuda; None: the setting


@dataclass
class BakeRequest:
    base: str
    output: str
    loras: list[BakeLora] = field(default_factory=list)
    prompt: str | None = None  # <lora:name:w> tags, added after ``loras``
    save_dtype: str | None = None  # None: the setting (default fp16)
    overwrite: bool = False
    allow_unmatched: bool = False
    dry_run: bool = False
    device: str | None = None  # auto, cpu, cuda; None: the setting


@dataclass
class GridRequest:
    loras: list[str] = field(default_factory=list)  # empty: the LoRAs tagged in the prompt
    prompt: str = ""
    negative_prompt: str = ""
    strengths: str | list[float] | None = None  # None/"": up to each LoRA's max-safe strength
    epochs: bool = False
    seeds: str | list[int] | None = None
    checkpoint: str | None = None  # None: the host's loaded checkpoint
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler_name: str = "Euler a"
    scheduler: str | None = None


@dataclass
class TriageRequest:
    folder: str | None = None  # inside the LoRA folders; None/"": every LoRA the host lists
    checkpoint: str | None = None  # None: the host's loaded checkpoint
    arch: str | None = None
    category: str | None = None
    name_filter: str | None = None
    prompts: dict[str, str] | None = None  # per category (defaults in lib_lorakit.eval.triage)
    seeds: str | list[int] | None = None
    strength: float | None = None  # None: each LoRA's max-safe strength
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler_name: str = "Euler a"
    scheduler: str | None = None
    name: str = ""


class Lorakit:
    def __init__(self, host: Host, jobs: JobManager | None = None):
        self.host = host
        self.jobs = jobs or JobManager()

    # --- lists -----------------------------------------------------------------------------
    def checkpoints(self) -> list[ModelEntry]:
        return self.host.list_checkpoints()

    def loras(self) -> list[ModelEntry]:
        return self.host.list_loras()

    def resolve_checkpoint(self, value: str) -> str:
        return resolve_model(value, self.checkpoints(), self.host.checkpoint_dirs(), "checkpoint")

    def resolve_lora(self, value: str) -> str:
        return resolve_model(value, self.loras(), self.host.lora_dirs(), "LoRA")

    def output_path(self, name: str) -> str:
        subdir = str(self.host.setting(SETTING_OUTPUT_SUBDIR, "") or "").strip().strip("/\\")
        return output_path(name, self.host.checkpoint_dirs()[0], subdir)

    # --- bake -------------------------------------------------------------------------------
    def prepare_bake(self, req: BakeRequest):
        """Resolve and check a request. Returns (base path, LoraSpecs, output path, save dtype)."""
        from .bake import SAVE_DTYPES, LoraSpec

        entries = list(req.loras)
        if req.prompt:
            entries += [BakeLora(t.name, t.strength, t.te_strength, t.blocks) for t in parse_tags(req.prompt)]
        if not entries:
            raise RecipeError("The recipe has no LoRA.", fix="Add LoRAs, or paste a prompt with <lora:name:weight> tags.")
        base = self.resolve_checkpoint(req.base)
        specs = []
        for e in entries:
            path = self.resolve_lora(e.name)
            specs.append(LoraSpec(path=path, strength=float(e.strength),
                                  te_strength=None if e.te_strength is None else float(e.te_strength),
                                  blocks=e.blocks or None, name=os.path.splitext(os.path.basename(path))[0]))
        out = None if req.dry_run else self.output_path(req.output)
        dtype = req.save_dtype or self.host.setting(SETTING_SAVE_DTYPE, "fp16")
        if dtype not in SAVE_DTYPES:
            raise RecipeError(f"Unknown save dtype {dtype!r}.", fix=f"Use one of {', '.join(SAVE_DTYPES)}.")
        if out is not None and os.path.isdir(os.path.dirname(out)):
            from .formats.safetensors_io import check_output_path

            check_output_path(out, overwrite=req.overwrite, inputs=[base] + [s.path for s in specs])
        return base, specs, out, dtype

    def start_bake(self, req: BakeRequest) -> Job:
        base, specs, out, dtype = self.prepare_bake(req)
        params = {"base": req.base, "loras": [vars(e) for e in req.loras], "prompt": req.prompt, "output": out,
                  "save_dtype": dtype, "dry_run": req.dry_run}

        def work(progress, cancel) -> dict[str, Any]:
            from .bake import bake

            if out is not None:
                os.makedirs(os.path.dirname(out), exist_ok=True)
            report = bake(base, specs, out, save_dtype=dtype, overwrite=req.overwrite,
                          allow_unmatched=req.allow_unmatched, dry_run=req.dry_run, progress=progress, cancel=cancel,
                          **host_kwargs(self.host, req.device))
            return {"report": report, "output": out, "checkpoint": self._written(out) if out else None}

        return self._run_job("bake", params, "lorakit: bake", work)

    # --- merge -------------------------------------------------------------------------------
    def vae_files(self) -> list[ModelEntry]:
        from .hosts import CHECKPOINT_EXTS, scan_models

        return scan_models(self.host.vae_dirs(), CHECKPOINT_EXTS)

    def _run_job(self, kind: str, params: dict[str, Any], title: str, work) -> Job:
        """Run ``work(progress, cancel)`` as a job under the host's queue lock, with host progress."""
        def run(job: Job) -> Any:
            with self.host.queue_lock():
                job.mark_running("starting")
                self.host.job_begin(title)
                try:
                    return work(self._progress(job, host_progress=True), job.cancel_event)
                finally:
                    self.host.job_end()

        return self.jobs.submit(kind, params, run)

    def _progress(self, job: Job, host_progress: bool = False):
        """A job's progress callback; the WebUI's own Interrupt button cancels the job too."""
        def progress(frac: float, msg: str) -> None:
            job.update(frac, msg)
            if host_progress:
                self.host.job_progress(frac, msg)
            if self.host.interrupted():
                job.cancel_event.set()

        return progress

    def _generating_backend(self, what: str, fix: str):
        """The in-process generation backend; the standalone launcher cannot make images (HTTP 501)."""
        from .gen.backend import GenerationUnavailable, HostBackend

        if self.host.flavour == "standalone":
            raise GenerationUnavailable(f"The standalone launcher cannot make images, so it cannot {what}.", fix=fix)
        return HostBackend(self.host)

    @staticmethod
    def _gen_settings(req) -> dict[str, Any]:
        return {k: getattr(req, k) for k in ("steps", "cfg_scale", "width", "height", "sampler_name", "scheduler")
                if getattr(req, k) not in (None, "")}

    def _written(self, out: str) -> str | None:
        """Refresh the host's list and return the new checkpoint's name in it."""
        self.host.refresh_checkpoints()
        for e in self.checkpoints():
            if os.path.realpath(e.path) == os.path.realpath(out):
                return e.name
        return None

    def prepare_merge(self, req: MergeRequest):
        from .merge import METHODS, ModelSpec

        if req.method not in METHODS:
            raise RecipeError(f"Unknown merge method {req.method!r}.", fix=f"Use one of {', '.join(METHODS)}.")
        if not req.models:
            raise RecipeError("No models to merge.", fix="Add at least two checkpoints.")
        models = [ModelSpec(self.resolve_checkpoint(m.name), float(m.weight)) for m in req.models]
        base = self.resolve_checkpoint(req.base) if req.base else None
        vae = req.vae_from
        if vae not in (None, "") and not (isinstance(vae, int) or str(vae).isdigit()):
            roots = self.host.vae_dirs() + self.host.checkpoint_dirs()
            vae = resolve_model(str(vae), self.vae_files() + self.checkpoints(), roots, "VAE")
        out = self.output_path(req.output)
        dtype = req.save_dtype or self.host.setting(SETTING_SAVE_DTYPE, "fp16")
        if os.path.isdir(os.path.dirname(out)):
            from .formats.safetensors_io import check_output_path

            check_output_path(out, overwrite=req.overwrite, inputs=[m.path for m in models] + ([base] if base else []))
        return models, base, vae, out, dtype

    def start_merge(self, req: MergeRequest) -> Job:
        models, base, vae, out, dtype = self.prepare_merge(req)
        params = {"models": [vars(m) for m in req.models], "method": req.method, "base": req.base,
                  "blocks": req.blocks, "vae_from": req.vae_from, "te_from": req.te_from, "output": out,
                  "save_dtype": dtype}

        def work(progress, cancel) -> dict[str, Any]:
            from .merge import merge

            os.makedirs(os.path.dirname(out), exist_ok=True)
            report = merge(models, out, method=req.method, base=base, blocks=req.blocks or None, vae_from=vae,
                           te_from=req.te_from, normalize=req.normalize, density=req.density, drop=req.drop,
                           seed=req.seed, scale=req.scale, save_dtype=dtype, overwrite=req.overwrite,
                           progress=progress, cancel=cancel, **host_kwargs(self.host, req.device))
            return {"report": report, "output": out, "checkpoint": self._written(out)}

        return self._run_job("merge", params, "lorakit: merge", work)

    def diff(self, a: str, b: str) -> dict[str, Any]:
        from .merge.diff import diff

        return diff(self.resolve_checkpoint(a), self.resolve_checkpoint(b))

    # --- inspect -------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        from .settings import load

        return load(self.host.data_dir())

    def update_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        from .settings import update

        return update(self.host.data_dir(), changes)

    def inspect(self, names: list[str] | None = None, *, all_loras: bool = False, checkpoint: str | None = None,
                weights: bool = False, progress=None, cancel=None) -> list[dict[str, Any]]:
        """Inspect LoRAs by name (or every LoRA in the host's list); headers only unless ``weights``."""
        from .inspect import inspect_paths

        if all_loras:
            entries = self.loras()
            paths = [e.path for e in entries]
            label = {e.path: e.name for e in entries}
        else:
            if not names:
                raise RecipeError("No LoRA to inspect.", fix="Give one or more LoRA names from the list.")
            paths, label = [], {}
            for n in names:
                path = self.resolve_lora(n)
                paths.append(path)
                label[path] = n
        ckpt = self.resolve_checkpoint(checkpoint) if checkpoint else None
        reports = inspect_paths(paths, checkpoint=ckpt, weights=weights, settings=self.settings(),
                                progress=progress, cancel=cancel)
        for r in reports:
            r["lora"] = label.get(r["file"], os.path.splitext(os.path.basename(r["file"]))[0])
        return reports

    def start_inspect_all(self, checkpoint: str | None = None, weights: bool = False) -> Job:
        """Inspect every LoRA in the host's list as a job (read-only: it does not take the queue lock)."""
        import time

        ckpt = checkpoint
        if ckpt:
            self.resolve_checkpoint(ckpt)  # refuse bad names before starting

        def run(job: Job) -> dict[str, Any]:
            job.mark_running("reading headers")
            t0 = time.perf_counter()
            reps = self.inspect(all_loras=True, checkpoint=ckpt, weights=weights, progress=job.update,
                                cancel=job.cancel_event)
            if job.cancel_event.is_set():
                from .errors import Cancelled

                raise Cancelled("Inspection cancelled.")
            return {"reports": reps, "seconds": time.perf_counter() - t0}

        return self.jobs.submit("inspect", {"all": True, "checkpoint": checkpoint, "weights": weights}, run)

    def write_user_metadata(self, name: str, activation_text: str | None, preferred_weight: float | None
                            ) -> dict[str, Any]:
        """Write the trigger / strength into the host's per-LoRA user metadata, then refresh its list."""
        from .inspect import usermeta
        from .inspect.structure import read_structure
        from .formats.sources import open_source

        path = self.resolve_lora(name)
        with open_source(path) as src:
            arch = read_structure(src).arch
        res = usermeta.write(path, activation_text=activation_text, preferred_weight=preferred_weight, arch=arch)
        self.host.refresh_loras()
        return res

    # --- strength grid ---------------------------------------------------------------------------
    def prepare_grid(self, req: GridRequest, backend=None):
        """The grid's spec and notes, names checked against the (refreshed) host lists."""
        from .gen.backend import HostBackend, resolve_name
        from .gen.grid import build_spec, parse_seeds
        from .settings import load as load_settings

        backend = backend or HostBackend(self.host)
        backend.refresh()
        ckpt_path = None
        if req.checkpoint:
            ckpt_path = resolve_name(req.checkpoint, backend.checkpoints(), "checkpoint").path
        else:
            cur = backend.current_checkpoint()
            if cur:
                ckpt_path = resolve_name(cur, backend.checkpoints(), "checkpoint").path
        return build_spec(backend.loras(), loras=req.loras, prompt=req.prompt, negative_prompt=req.negative_prompt,
                          strengths=req.strengths, epochs=req.epochs, seeds=parse_seeds(req.seeds),
                          checkpoint=req.checkpoint or None, checkpoint_path=ckpt_path,
                          settings=self._gen_settings(req),
                          inspector_settings=load_settings(self.host.data_dir()))

    def start_grid(self, req: GridRequest) -> Job:
        """A strength grid as a job. Each image waits for the host's queue on its own, so the WebUI stays
        usable between images; the job's progress counts images."""
        from .gen.grid import run_grid

        backend = self._generating_backend(
            "run a strength grid", "Run it in the WebUI, or use `python -m lib_lorakit autotest --webui URL`.")
        spec, notes = self.prepare_grid(req, backend)
        cells = spec.cells()  # refuse an oversized grid before starting

        def run(job: Job) -> dict[str, Any]:
            job.mark_running(f"{len(cells)} images")
            res = run_grid(backend, spec, self.host.outputs_dir(), notes=notes, progress=self._progress(job),
                           cancel=job.cancel_event)
            res.pop("grid_image", None)
            return res

        return self.jobs.submit("grid", {**vars(req), "images": len(cells)}, run)

    # --- triage ------------------------------------------------------------------------------------
    def triage_store(self):
        from .eval.store import Store

        if getattr(self, "_store", None) is None:
            self._store = Store(self.host.data_dir())
        return self._store

    def triage(self, tid: str):
        from .eval.triage import Triage

        return Triage(self.triage_store(), tid)

    def start_triage(self, req: TriageRequest) -> tuple[Job, str]:
        """Plan (synchronously: bad names and empty folders answer at once) and generate as a job."""
        from .eval.triage import create_triage, generate
        from .gen.grid import parse_seeds
        from .settings import load as load_settings

        backend = self._generating_backend(
            "generate a triage", "Create it in the WebUI or with `python -m lib_lorakit triage create --webui URL`; "
                                 "the standalone launcher can review it.")
        if req.folder:
            from .safepath import inside

            roots = self.host.lora_dirs()
            target = req.folder if os.path.isabs(req.folder) else os.path.join(roots[0], req.folder)
            if not inside(target, roots):
                from .safepath import PathRefused

                raise PathRefused(f"{req.folder} is outside the LoRA folders.", fix="Pick a folder inside them.")
        t = create_triage(self.triage_store(), backend, folder=req.folder or None, roots=self.host.lora_dirs(),
                          checkpoint=req.checkpoint, prompts=req.prompts, seeds=parse_seeds(req.seeds),
                          strength=req.strength, negative_prompt=req.negative_prompt, settings=self._gen_settings(req),
                          arch=req.arch, category=req.category, name_filter=req.name_filter,
                          inspector_settings=load_settings(self.host.data_dir()), name=req.name)

        def run(job: Job) -> dict[str, Any]:
            job.mark_running("generating")
            rec = generate(t, backend, self.host.outputs_dir(), progress=self._progress(job), cancel=job.cancel_event)
            return {"triage_id": t.id, "record": rec, "state": self.triage(t.id).state()}

        return self.jobs.submit("triage", {"triage_id": t.id, **vars(req)}, run), t.id

    def archive_dir(self) -> str:
        roots = self.host.lora_dirs()
        return os.path.join(os.path.dirname(os.path.realpath(roots[0])), "Lora-archive")

    def triage_archive(self, tid: str, decision: str = "no") -> dict[str, Any]:
        from .eval.triage import archive

        res = archive(self.triage(tid), self.archive_dir(), self.host.lora_dirs(), decision=decision)
        self.host.refresh_loras()
        return res

    def triage_restore(self, batch: str) -> dict[str, Any]:
        from .eval.triage import restore
        from .safepath import PathRefused, inside

        base = self.archive_dir()
        path = batch if os.path.isabs(batch) else os.path.join(base, batch)
        if not inside(path, [base]):
            raise PathRefused(f"{batch} is not an archive batch of lorakit's archive folder {base}.")
        res = restore(path)
        self.host.refresh_loras()
        return res

    # --- tournaments ---------------------------------------------------------------------------------
    def tournaments(self):
        from .eval.tournament import Tournaments

        if getattr(self, "_tours", None) is None:
            self._tours = Tournaments(self.triage_store())
        return self._tours

    def create_tournament(self, data: dict[str, Any], parent: str | None = None, round_no: int = 1) -> str:
        from .eval.tournament import Candidate, TournamentSpec

        try:
            spec = TournamentSpec(name=str(data.get("name") or "tournament"),
                                  candidates=[Candidate(**{k: v for k, v in c.items() if v is not None})
                                              for c in data.get("candidates") or []],
                                  prompts=[dict(p) for p in data.get("prompts") or []],
                                  settings=dict(data.get("settings") or {}),
                                  first_version=bool(data.get("first_version")))
        except TypeError as e:
            raise RecipeError(f"Bad candidate: {e}.") from None
        return self.tournaments().create(spec, parent=parent, round_no=round_no)

    def build_merge(self, cand, name: str) -> str:
        """Build a merge candidate into the checkpoint folder; returns its name in the host's list."""
        from .merge import ModelSpec, merge

        m = cand.merge
        out = self.output_path(name)
        if os.path.exists(out):  # built by an earlier, interrupted run of this tournament
            return self._written(out) or os.path.basename(out)
        models = [ModelSpec(self.resolve_checkpoint(x["name"]), float(x.get("weight", 1.0))) for x in m["models"]]
        base = self.resolve_checkpoint(m["base"]) if m.get("base") else None
        os.makedirs(os.path.dirname(out), exist_ok=True)
        merge(models, out, method=m.get("method", "weighted"), base=base, blocks=m.get("blocks") or None,
              save_dtype=m.get("save_dtype") or self.host.setting(SETTING_SAVE_DTYPE, "fp16"))
        return self._written(out) or os.path.basename(out)

    def start_tournament(self, tid: str) -> Job:
        """Build merge candidates and generate every image, as a job (each image waits for the queue)."""
        from .eval.tournament import generate

        self.tournaments().get(tid)
        backend = self._generating_backend(
            "generate a tournament", "Generate in the WebUI or with `python -m lib_lorakit tournament generate "
                                     "--webui URL`; the standalone launcher can run the blind ranking.")

        def run(job: Job) -> dict[str, Any]:
            job.mark_running("starting")

            def build(c, name):
                job.update(0.0, f"merging {c.id}")
                with self.host.queue_lock():
                    return self.build_merge(c, name)

            rec = generate(self.tournaments(), tid, backend, self.host.outputs_dir(), build_merge=build,
                           progress=self._progress(job), cancel=job.cancel_event)
            return {"tournament": tid, "record": rec}

        return self.jobs.submit("tournament", {"tournament": tid}, run)
