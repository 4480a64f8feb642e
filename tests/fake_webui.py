"""A fake ``modules`` package with the surface lorakit's host adapter uses, for both flavours.

Mirrors A1111 1.10 / Forge: modules.paths, shared (opts, cmd_opts, state, OptionInfo),
sd_models (checkpoints_list, list_models), shared_items, call_queue.queue_lock,
processing, script_callbacks, ui_extra_networks. Forge additionally has `backend` and
`modules_forge` packages and a FIFO queue lock.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import types


class State:
    def __init__(self):
        self.interrupted = False
        self.job = ""
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.log = []

    def begin(self, job="(unknown)"):
        self.interrupted = False
        self.job = job
        self.job_count = -1
        self.log.append(("begin", job))

    def end(self):
        self.log.append(("end", self.job))
        self.job = ""

    def interrupt(self):
        self.interrupted = True


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None, **kw):
        self.default, self.label, self.component, self.component_args, self.section = (
            default,
            label,
            component,
            component_args,
            section,
        )
        self.onchange = onchange
        self.comment_before, self.comment_after = kw.get("comment_before", ""), kw.get("comment_after", "")


class Options:
    """A1111 1.10's modules/options.Options: values in ``data``; ``set`` runs the option's onchange and puts
    the old value back when it raises (the host prints the traceback then: ``errors`` records it here)."""

    def __init__(self):
        object.__setattr__(self, "data_labels", {})
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "errors", [])

    def __setattr__(self, key, value):
        self.data[key] = value

    def __getattr__(self, key):
        if key in self.data:
            return self.data[key]
        if key in self.data_labels:
            return self.data_labels[key].default
        raise AttributeError(key)

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def set(self, key, value):
        old = self.data.get(key)
        if old == value:
            return False
        self.data[key] = value
        info = self.data_labels[key]
        if info.onchange is not None:
            try:
                info.onchange()
            except Exception as e:
                self.errors.append(e)
                self.data[key] = old
                return False
        return True


class CheckpointInfo:
    def __init__(self, filename, root):
        self.filename = filename
        self.name = os.path.relpath(filename, root).replace(os.sep, "/")
        h = hashlib.sha256(self.name.encode()).hexdigest()[:10]
        self.title = f"{self.name} [{h}]"


class FIFOLock:
    """Forge's queue lock type: a context manager around a lock."""

    def __init__(self):
        self._l = threading.Lock()

    def __enter__(self):
        self._l.acquire()
        return self

    def __exit__(self, *exc):
        self._l.release()

    def locked(self):
        return self._l.locked()


def install(monkeypatch, root: str, flavour: str = "a1111"):
    """Put a fake WebUI in sys.modules, rooted at ``root`` (models/, outputs/). Returns the modules."""
    models = os.path.join(root, "models")
    os.makedirs(os.path.join(models, "Stable-diffusion"), exist_ok=True)
    os.makedirs(os.path.join(models, "Lora"), exist_ok=True)
    mods = {}

    def mod(name):
        m = types.ModuleType(name)
        mods[name] = m
        return m

    pkg = mod("modules")
    pkg.__path__ = []
    paths = mod("modules.paths")
    paths.models_path = models
    paths.data_path = root
    shared = mod("modules.shared")
    shared.opts = Options()
    shared.opts.outdir_samples = ""
    shared.cmd_opts = types.SimpleNamespace(
        ckpt_dir=None,
        lora_dir=os.path.join(models, "Lora"),
        lyco_dir_backcompat=os.path.join(models, "LyCORIS"),
        api_auth=None,
    )
    shared.state = State()
    shared.OptionInfo = OptionInfo
    shared.sd_model = object()
    sd_models = mod("modules.sd_models")
    sd_models.model_path = os.path.join(models, "Stable-diffusion")
    sd_models.checkpoints_list = {}
    sd_models.list_calls = 0

    def list_models():
        sd_models.list_calls += 1
        sd_models.checkpoints_list.clear()
        for dp, _, files in os.walk(sd_models.model_path):
            for f in sorted(files):
                if f.endswith((".safetensors", ".ckpt")):
                    ci = CheckpointInfo(os.path.join(dp, f), sd_models.model_path)
                    sd_models.checkpoints_list[ci.title] = ci

    sd_models.list_models = list_models
    shared_items = mod("modules.shared_items")
    shared_items.refresh_checkpoints = lambda: sd_models.list_models()
    call_queue = mod("modules.call_queue")
    call_queue.queue_lock = FIFOLock() if flavour == "forge" else threading.Lock()
    processing = mod("modules.processing")

    class Processed:  # modules.processing.Processed(p, images_list, seed, info, ..., infotexts=...)
        def __init__(self, p, images_list=None, seed=None, info="", infotexts=None, **kw):
            from PIL import Image

            n = int(getattr(p, "batch_size", 1) or 1)
            if images_list is None and n > 1:  # a batch: seeds seed, seed+1, ... as the WebUI assigns them
                self.all_seeds = [int(p.seed) + i for i in range(n)]
                images_list = [Image.new("RGB", (p.width, p.height), (s % 256, 20, 30)) for s in self.all_seeds]
                infotexts = [
                    f"{p.prompt}\nSteps: {p.steps}, Sampler: {p.sampler_name}, Seed: {s}" for s in self.all_seeds
                ]
            if images_list is None:
                images_list = [Image.new("RGB", (p.width, p.height), (10, 20, 30))]
                infotexts = [f"{p.prompt}\nSteps: {p.steps}, Sampler: {p.sampler_name}, Seed: {p.seed}"]
            self.images = images_list
            self.infotexts = infotexts or [info]
            self.info = info
            self.seed = p.seed if seed is None else seed

    processing.Processed = Processed

    class Txt2Img:
        def __init__(self, sd_model=None, **kw):
            self.sd_model = sd_model
            self.scheduler = None
            self.closed = False
            for k, v in kw.items():
                setattr(self, k, v)

        def close(self):
            self.closed = True

    processing.StableDiffusionProcessingTxt2Img = Txt2Img
    processing.calls = []

    def process_images(p):
        processing.calls.append((p, call_queue.queue_lock.locked()))
        return Processed(p)

    processing.process_images = process_images
    scripts = mod("modules.scripts")

    class Script:  # the base class A1111/Forge scripts subclass
        def title(self):
            raise NotImplementedError

    scripts.Script = Script
    images = mod("modules.images")
    images.saved = []
    images.save_image = lambda image, path, basename, **kw: images.saved.append((image, path, basename, kw))
    shared.opts.grid_save = True
    shared.opts.grid_format = "png"
    cb = mod("modules.script_callbacks")
    cb.registered = {}
    for name in ("on_ui_tabs", "on_ui_settings", "on_app_started", "on_script_unloaded"):
        cb.__dict__[name] = (lambda n: lambda fn: cb.registered.setdefault(n, []).append(fn))(name)
    uen = mod("modules.ui_extra_networks")
    page = types.SimpleNamespace(name="lora", refreshed=0)
    page.refresh = lambda: setattr(page, "refreshed", page.refreshed + 1)
    uen.extra_pages = [page]
    for name in (
        "paths",
        "shared",
        "sd_models",
        "shared_items",
        "call_queue",
        "processing",
        "script_callbacks",
        "ui_extra_networks",
        "scripts",
        "images",
    ):
        setattr(pkg, name, mods[f"modules.{name}"])
    if flavour == "forge":
        b = mod("backend")
        b.__path__ = []
        mf = mod("modules_forge")
        mf.__path__ = []
    for name, m in mods.items():
        monkeypatch.setitem(sys.modules, name, m)
    if flavour != "forge":
        for name in ("backend", "modules_forge"):
            monkeypatch.delitem(sys.modules, name, raising=False)
    sd_models.list_models()
    return types.SimpleNamespace(**{k.replace("modules.", "").replace(".", "_"): v for k, v in mods.items()})
