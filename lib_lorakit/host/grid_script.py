"""The txt2img Script "lorakit: LoRA strength grid" (A1111 1.10 and Forge).

Runs inside the WebUI's own txt2img (it already holds the queue), with the user's prompt
and settings: each cell is a copy of the processing object with the cell's prompt and
seed, as the built-in X/Y/Z plot does. Everything else — the plan, the run folder and
manifest, the post-checks, the verdicts, the grid picture — is lorakit's library.

From the API: ``POST /sdapi/v1/txt2img`` with ``"script_name": "lorakit: lora strength grid"``
and ``"script_args": [loras, strengths, epochs, seeds, return_images, use_profile]`` (see the README).
With ``use_profile`` (the tab's default; False for API calls that leave it out) the images are
made with the loaded checkpoint's generation profile (size, sampler, schedule, steps, CFG, clip
skip) instead of the txt2img fields; the prompt is always yours.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from ..gen.backend import GenError, GenImage, HostBackend

TITLE = "lorakit: LoRA strength grid"


def _m(name: str):
    import importlib

    return importlib.import_module(name)


class ScriptBackend(HostBackend):
    """Generates with copies of the running txt2img's processing object (no queue lock: the
    WebUI's txt2img already holds it; the loaded checkpoint only)."""

    kind = "script"

    def __init__(self, host, p):
        super().__init__(host)
        self.p = p

    def txt2img(self, request: dict[str, Any]) -> GenImage:
        processing = _m("modules.processing")
        state = _m("modules.shared").state
        if state.interrupted:
            raise GenError("Interrupted.")
        pc = copy.copy(self.p)
        pc.prompt = request["prompt"]
        pc.negative_prompt = request.get("negative_prompt", pc.negative_prompt)
        pc.seed = int(request["seed"])
        pc.subseed_strength = 0
        for k in ("width", "height", "steps", "cfg_scale", "sampler_name"):
            if request.get(k) not in (None, ""):
                setattr(pc, k, request[k])
        if request.get("scheduler") and hasattr(pc, "scheduler"):
            pc.scheduler = request["scheduler"]
        if request.get("clip_skip"):
            pc.override_settings = {
                **(getattr(pc, "override_settings", None) or {}),
                "CLIP_stop_at_last_layers": int(request["clip_skip"]),
            }
        pc.batch_size = 1
        pc.n_iter = 1
        pc.do_not_save_grid = True
        pc.do_not_save_samples = True
        for attr in ("all_prompts", "all_negative_prompts", "all_seeds", "all_subseeds"):
            if hasattr(pc, attr):
                setattr(pc, attr, None)
        processed = processing.process_images(pc)
        if not processed.images:
            raise GenError("The WebUI returned no image.", fix="See the WebUI console for the error.")
        info = (processed.infotexts or [processed.info or ""])[0]
        return GenImage(processed.images[0], info, int(processed.seed))


def parse_args(args: tuple) -> dict[str, Any]:
    """script_args → options; short lists (old API calls) get the defaults."""
    vals = list(args) + [None] * 6
    loras, strengths, epochs, seeds, return_images, use_profile = vals[:6]
    if isinstance(loras, str):
        loras = [x.strip() for x in loras.split(",") if x.strip()]
    return {
        "loras": list(loras or []),
        "strengths": (strengths or "").strip() or None,
        "epochs": bool(epochs),
        "seeds": (str(seeds).strip() if seeds not in (None, "") else None),
        "return_images": True if return_images is None else bool(return_images),
        "use_profile": bool(use_profile),
    }


def run_script(p, *args) -> Any:
    """The Script's run(): the grid for ``p``; returns a ``Processed`` with the grid first."""
    import time

    from ..gen.grid import build_spec, parse_seeds, run_grid
    from ..settings import load as load_settings
    from . import get_host

    t_start = time.perf_counter()
    processing = _m("modules.processing")
    shared = _m("modules.shared")
    opts = parse_args(args)
    host = get_host()
    backend = ScriptBackend(host, p)
    backend.refresh()
    seed = int(p.seed) if p.seed not in (None, "", -1) else None
    if seed is None:
        import random

        seed = random.randrange(2**31)  # one fixed seed: the baseline and every strength share it
    seeds = parse_seeds(opts["seeds"], default=seed)
    cur = host.current_checkpoint()
    ck_path = next((e.path for e in host.list_checkpoints() if e.name == cur), None)
    settings = {
        "steps": p.steps,
        "cfg_scale": p.cfg_scale,
        "width": p.width,
        "height": p.height,
        "sampler_name": p.sampler_name,
    }
    if getattr(p, "scheduler", None):
        settings["scheduler"] = p.scheduler
    clip = getattr(getattr(shared, "opts", None), "CLIP_stop_at_last_layers", None)
    if isinstance(clip, int) and clip >= 1:
        settings["clip_skip"] = clip
    if opts["use_profile"]:
        settings = {}  # the checkpoint's profile decides; the txt2img fields are not overrides here
    spec, notes = build_spec(
        backend.loras(),
        loras=opts["loras"],
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        strengths=opts["strengths"],
        epochs=opts["epochs"],
        seeds=seeds,
        checkpoint=cur,
        checkpoint_path=ck_path,
        settings=settings,
        inspector_settings=load_settings(host.data_dir()),
    )
    cells = spec.cells()
    shared.state.job_count = len(cells)

    def progress(frac: float, msg: str) -> None:
        shared.state.textinfo = f"lorakit grid: {msg}"

    res = run_grid(backend, spec, host.outputs_dir(), notes=notes, progress=progress, max_cell=512)
    grid = res.pop("grid_image")
    from ..gen.run import Run

    run = Run(res["run_dir"])
    images, infos = [grid], [_grid_info(res)]
    if opts["return_images"]:
        results = run.results()
        for c in run.cells:
            ev = results.get(c.key)
            if ev and ev["status"] == "ok":
                images.append(run.load_image(ev))
                infos.append(ev.get("infotext") or "")
    _save_grid(p, grid, infos[0])
    from ..gen.run import update_record

    total = time.perf_counter() - t_start  # everything the Script did, generation included
    update_record(
        run,
        seconds_script=round(total, 3),
        seconds_lorakit_script=round(total - res["record"]["seconds_generating"], 3),
    )
    return processing.Processed(p, images, seeds[0], infos[0], infotexts=infos)


def _grid_info(res: dict[str, Any]) -> str:
    lines = [f"lorakit strength grid, run folder {res['run_dir']}"]
    lines += [f"{row}: {v['case']} - {v['text']}" for row, v in res["verdicts"].items()]
    lines += [f"note: {n}" for n in res.get("notes", [])]
    return "\n".join(lines)


def _save_grid(p, grid, info: str) -> None:
    """Save the grid where the WebUI saves grids, when its settings ask for it."""
    try:
        shared = _m("modules.shared")
        if not getattr(shared.opts, "grid_save", True):
            return
        images = _m("modules.images")
        images.save_image(
            grid,
            p.outpath_grids,
            "lorakit_grid",
            extension=shared.opts.grid_format,
            prompt=p.prompt,
            seed=p.seed,
            grid=True,
            p=p,
            info=info,
        )
    except Exception:  # the grid is in the run folder in any case
        pass


def script_class():
    """The Script class, built on the host's ``modules.scripts.Script`` (imported only here)."""
    scripts = _m("modules.scripts")

    class Script(scripts.Script):
        def title(self):
            return TITLE

        def show(self, is_img2img):
            return not is_img2img

        def ui(self, is_img2img):
            import gradio as gr

            from . import get_host

            try:
                names = sorted({os.path.splitext(os.path.basename(e.path))[0] for e in get_host().list_loras()})
            except Exception:
                names = []
            with gr.Group():
                loras = gr.Dropdown(
                    label="LoRAs (rows; empty: the LoRAs tagged in the prompt)",
                    choices=names,
                    multiselect=True,
                    elem_id="lorakit_grid_loras",
                )
                with gr.Row():
                    # the hints go in info= (wrapped under the label), not in a one-line placeholder that is cut off
                    strengths = gr.Textbox(
                        label="Strengths",
                        placeholder="0, 0.25, 0.5 or 0-1.5:0.25",
                        info="Empty: 0 up to each LoRA's max-safe strength",
                        elem_id="lorakit_grid_strengths",
                    )
                    seeds = gr.Textbox(
                        label="Seeds",
                        placeholder="1, 2, 3 or 3x",
                        info="Empty: the seed above",
                        elem_id="lorakit_grid_seeds",
                    )
                with gr.Row():
                    epochs = gr.Checkbox(
                        label="Rows: every epoch of each LoRA's training run",
                        value=False,
                        elem_id="lorakit_grid_epochs",
                    )
                    return_images = gr.Checkbox(
                        label="Also show the individual images", value=True, elem_id="lorakit_grid_images"
                    )
                    use_profile = gr.Checkbox(
                        label="Settings from the checkpoint's profile (size, sampler, steps, "
                        "CFG, clip skip), not the fields above",
                        value=True,
                        elem_id="lorakit_grid_profile",
                    )
                gr.HTML(
                    "<p style='opacity:.7'>A baseline column at strength 0 (no LoRA, same seed) is always "
                    "included. The tested LoRAs' tags are taken out of the prompt and set per cell. Each row "
                    "gets a verdict (no effect / weak / healthy / overfit); images, manifest and summary go to "
                    "outputs/lorakit/grid/.</p>"
                )
            return [loras, strengths, epochs, seeds, return_images, use_profile]

        def run(self, p, *args):
            return run_script(p, *args)

    return Script
