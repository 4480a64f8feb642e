"""Host adapter for the AUTOMATIC1111 WebUI 1.10 and Forge.

Only public, stable parts of the host are used: ``modules.paths``, ``modules.shared``
(opts, cmd_opts, state), ``modules.sd_models`` (folders, titles), ``modules.shared_items``,
``modules.call_queue.queue_lock``, ``modules.processing`` and ``modules.ui_extra_networks``.
Nothing is patched. Lists are scanned from the host's folders on every call, so a model
copied in after start-up is found; the host's own lists are refreshed after lorakit
writes a model.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from ..hosts import LORA_EXTS, ModelEntry, scan_checkpoints, scan_models

_FALLBACK_LOCK = threading.Lock()
STEPS = 1000  # progress is reported to the host as sampling steps out of STEPS


def _m(name: str):
    import importlib

    return importlib.import_module(name)


class WebUIHost:
    def __init__(self, flavour: str):
        self.flavour = flavour

    # --- folders ----------------------------------------------------------------------------
    def _models_path(self) -> str:
        return _m("modules.paths").models_path

    def checkpoint_dirs(self) -> list[str]:
        sd_models = _m("modules.sd_models")
        shared = _m("modules.shared")
        dirs = [getattr(sd_models, "model_path", os.path.join(self._models_path(), "Stable-diffusion"))]
        extra = getattr(shared.cmd_opts, "ckpt_dir", None)
        if extra:
            dirs.append(extra)
        for d in getattr(shared.cmd_opts, "ckpt_dirs", None) or []:  # Forge: several folders
            dirs.append(d)
        return _unique(dirs)

    def lora_dirs(self) -> list[str]:
        shared = _m("modules.shared")
        dirs = [getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(self._models_path(), "Lora")]
        for d in getattr(shared.cmd_opts, "lora_dirs", None) or []:
            dirs.append(d)
        lyco = getattr(shared.cmd_opts, "lyco_dir_backcompat", None)
        if lyco and os.path.isdir(lyco):
            dirs.append(lyco)
        return _unique(dirs)

    def vae_dirs(self) -> list[str]:
        shared = _m("modules.shared")
        dirs = [os.path.join(self._models_path(), "VAE")]
        if getattr(shared.cmd_opts, "vae_dir", None):
            dirs.append(shared.cmd_opts.vae_dir)
        return _unique(dirs)

    def outputs_dir(self) -> str:
        shared = _m("modules.shared")
        base = getattr(shared.opts, "outdir_samples", "") or os.path.join(_m("modules.paths").data_path, "outputs")
        return os.path.abspath(base)

    def data_dir(self) -> str:
        return os.path.join(_m("modules.paths").data_path, "lorakit")

    # --- engines ----------------------------------------------------------------------------
    def engine_device(self) -> str:
        """The device the WebUI computes on, for bake/merge ``auto``: its GPU, else the CPU."""
        try:
            dev = getattr(_m("modules.devices"), "device", None)
        except ImportError:
            return "cpu"
        return str(dev) if getattr(dev, "type", None) == "cuda" else "cpu"

    def cmd_flags(self) -> dict[str, Any]:
        """The WebUI's parsed command-line flags."""
        try:
            return dict(vars(_m("modules.shared").cmd_opts))
        except (ImportError, AttributeError, TypeError):
            return {}

    def known_sha256(self, path: str) -> str | None:
        """The checkpoint's SHA-256 from the WebUI's cache.json, when it computed it for this mtime."""
        try:
            cache = _m("modules.cache").cache("hashes")
            sd_models = _m("modules.sd_models")
            for ci in list(sd_models.checkpoints_list.values()):
                if os.path.realpath(ci.filename) == path:
                    e = cache.get(f"checkpoint/{ci.name}") or {}
                    if e.get("sha256") and float(e.get("mtime", 0)) >= os.path.getmtime(path):
                        return str(e["sha256"])
        except (ImportError, AttributeError, OSError, TypeError, ValueError):
            return None
        return None

    # --- lists ------------------------------------------------------------------------------
    def _titles(self) -> dict[str, str]:
        """file path -> the host's checkpoint title, for the files the host already knows."""
        try:
            sd_models = _m("modules.sd_models")
            return {os.path.realpath(ci.filename): ci.title for ci in list(sd_models.checkpoints_list.values())}
        except Exception:
            return {}

    def list_checkpoints(self) -> list[ModelEntry]:
        return scan_checkpoints(self.checkpoint_dirs(), self._titles())

    def current_checkpoint(self) -> str | None:
        """The checkpoint selected in the WebUI, as named in :meth:`list_checkpoints`."""
        try:
            sel = _m("modules.shared").opts.sd_model_checkpoint
        except AttributeError:
            return None
        for e in self.list_checkpoints():
            if sel and (sel == e.name or sel in e.aliases):
                return e.name
        return None

    def list_loras(self) -> list[ModelEntry]:
        return scan_models(self.lora_dirs(), LORA_EXTS)

    def refresh_checkpoints(self) -> None:
        try:
            _m("modules.shared_items").refresh_checkpoints()
        except (ImportError, AttributeError):
            _m("modules.sd_models").list_models()

    def refresh_loras(self) -> None:
        try:
            for page in _m("modules.ui_extra_networks").extra_pages:
                if getattr(page, "name", "") in ("lora", "lycoris"):
                    page.refresh()
        except Exception:  # the list refreshes itself on the next visit to the tab
            pass

    # --- jobs ---------------------------------------------------------------------------------
    def queue_lock(self) -> contextlib.AbstractContextManager:
        try:
            return _m("modules.call_queue").queue_lock
        except (ImportError, AttributeError):
            return _FALLBACK_LOCK

    def job_begin(self, title: str) -> None:
        state = _m("modules.shared").state
        state.begin(job=title)
        state.job_count = 1
        state.sampling_steps = STEPS
        state.sampling_step = 0
        state.textinfo = title

    def job_progress(self, fraction: float, message: str) -> None:
        state = _m("modules.shared").state
        state.sampling_step = int(max(0.0, min(1.0, fraction)) * STEPS)
        state.textinfo = message

    def job_end(self) -> None:
        _m("modules.shared").state.end()

    def interrupt(self) -> None:
        """Stop the image being made (the WebUI's Interrupt button)."""
        state = _m("modules.shared").state
        if hasattr(state, "interrupt"):
            state.interrupt()

    def interrupted(self) -> bool:
        state = _m("modules.shared").state
        return bool(getattr(state, "interrupted", False))

    # --- settings -------------------------------------------------------------------------------
    def setting(self, name: str, default: Any) -> Any:
        opts = _m("modules.shared").opts
        try:
            v = getattr(opts, name)
        except AttributeError:
            return default
        return default if v is None else v

    # --- generation -------------------------------------------------------------------------------
    def txt2img(self, request: dict[str, Any]) -> dict[str, Any]:
        """Generate through the host's own processing, under its queue lock.

        ``request``: prompt, negative_prompt, seed, sampler_name, scheduler, steps, cfg_scale,
        width, height, checkpoint (a name from :meth:`list_checkpoints`; the host's previous
        checkpoint is restored afterwards). Returns {"images": [PIL], "infotexts": [str], "seed": int}.
        """
        processing = _m("modules.processing")
        shared = _m("modules.shared")
        override: dict[str, Any] = {}
        ckpt = request.get("checkpoint")
        if ckpt:
            override["sd_model_checkpoint"] = self._checkpoint_title(ckpt)
        if request.get("clip_skip"):
            override["CLIP_stop_at_last_layers"] = int(request["clip_skip"])
        from ..gen.profiles import default_settings

        gs = {**default_settings(), **{k: v for k, v in request.items() if v is not None}}
        kw = dict(
            prompt=request.get("prompt", ""),
            negative_prompt=request.get("negative_prompt", ""),
            seed=int(request.get("seed", -1)),
            sampler_name=gs["sampler_name"],
            steps=int(gs["steps"]),
            cfg_scale=float(gs["cfg_scale"]),
            width=int(gs["width"]),
            height=int(gs["height"]),
            batch_size=max(1, int(request.get("batch_size") or 1)),  # seeds seed, seed+1, ... as the WebUI assigns
            n_iter=1,
            do_not_save_samples=True,
            do_not_save_grid=True,
            override_settings=override,
            override_settings_restore_afterwards=True,
        )
        with self.queue_lock():
            shared.state.begin(job="lorakit: txt2img")
            try:
                p = processing.StableDiffusionProcessingTxt2Img(sd_model=getattr(shared, "sd_model", None), **kw)
                if request.get("scheduler") and hasattr(p, "scheduler"):
                    p.scheduler = request["scheduler"]
                try:
                    processed = processing.process_images(p)
                finally:
                    close = getattr(p, "close", None)
                    if close:
                        close()
            finally:
                shared.state.end()
        return {
            "images": list(processed.images),
            "infotexts": list(getattr(processed, "infotexts", []) or []),
            "seed": getattr(processed, "seed", kw["seed"]),
            "all_seeds": list(
                getattr(processed, "all_seeds", None) or [kw["seed"] + i for i in range(kw["batch_size"])]
            ),
        }

    def _checkpoint_title(self, name: str) -> str:
        """The host's title for a checkpoint name or path (refreshing its list if it is new)."""
        from ..safepath import resolve_model

        path = os.path.realpath(resolve_model(name, self.list_checkpoints(), self.checkpoint_dirs(), "checkpoint"))
        titles = self._titles()
        if path not in titles:
            self.refresh_checkpoints()
            titles = self._titles()
        return titles.get(path, name)


def _unique(dirs: list[str]) -> list[str]:
    out: list[str] = []
    for d in dirs:
        a = os.path.abspath(d)
        if a not in out:
            out.append(a)
    return out
