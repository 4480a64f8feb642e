"""Command line: ``python -m lib_lorakit <command>``.

Exit codes: 0 done, 2 bad input (the message on stderr says what to do),
1 unexpected failure, 130 interrupted. No command leaves a partial output behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback

from . import __version__, engineopts
from .errors import LorakitError, RecipeError

log = logging.getLogger("lorakit")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's exit code 2 matches "bad input"
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _progress_printer(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    state = {"last": -1}

    def show(frac: float, msg: str) -> None:
        pct = int(frac * 100)
        if pct != state["last"]:
            state["last"] = pct
            sys.stderr.write(f"\r[{pct:3d}%] {msg[:70]:<70}")
            sys.stderr.flush()
            if frac >= 1.0:
                sys.stderr.write("\n")

    return show


def _write_report(path: str | None, report: dict) -> None:
    if not path:
        return
    from .formats.safetensors_io import check_output_path

    tmp = f"{path}.tmp-{os.getpid()}"
    check_output_path(path, overwrite=True)
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def cmd_bake(args: argparse.Namespace) -> int:
    from .bake import LoraSpec, bake, parse_lora_arg, summary

    specs: list[LoraSpec] = [parse_lora_arg(x) for x in args.lora or []]
    for item in args.blocks or []:
        hits = [(s, item[len(n) + 1:]) for s in specs
                for n in dict.fromkeys((s.path, os.path.basename(s.path), s.label)) if item.startswith(n + "=")]
        if not hits:
            names = ", ".join(s.label for s in specs) or "none"
            raise RecipeError(f"--blocks {item!r} names no --lora (LoRAs: {names}).",
                              fix="Write --blocks NAME=PRESET_OR_VECTOR with NAME the LoRA's path, file name or "
                                  "name without extension.")
        for s, weights in hits:
            s.blocks = weights
    report = bake(args.base, specs, args.output, save_dtype=args.save_dtype, overwrite=args.overwrite,
                  allow_unmatched=args.allow_unmatched, dry_run=args.dry_run,
                  progress=_progress_printer(not args.quiet), **engineopts.cli_kwargs(args))
    _write_report(args.report, report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(summary(report))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge, parse_model_arg, summary

    models = [parse_model_arg(x) for x in args.model]
    te_from = None
    if args.te_from is not None:
        try:
            te_from = int(args.te_from)
        except ValueError:
            raise RecipeError(f"--te-from {args.te_from!r} must be a model number (1 for the first --model).") from None
    report = merge(models, args.output, method=args.method, base=args.base, blocks=args.blocks,
                   vae_from=args.vae_from, te_from=te_from, normalize=not args.no_normalize, density=args.density,
                   drop=args.drop, seed=args.seed, scale=args.scale, save_dtype=args.save_dtype,
                   overwrite=args.overwrite, progress=_progress_printer(not args.quiet),
                   **engineopts.cli_kwargs(args))
    _write_report(args.report, report)
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from .merge.diff import chart, diff, table

    result = diff(args.a, args.b, progress=_progress_printer(not args.quiet))
    if args.chart:
        from .formats.safetensors_io import check_output_path

        check_output_path(args.chart, overwrite=True)
        tmp = args.chart + f".tmp-{os.getpid()}.png"
        chart(result, f"{os.path.basename(args.b)} vs {os.path.basename(args.a)}").save(tmp)
        os.replace(tmp, args.chart)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{os.path.basename(args.b)} against {os.path.basename(args.a)} ({result['arch']}):")
        print(table(result))
        for what in ("only_in_a", "only_in_b", "shape_mismatch"):
            if result[what]:
                print(f"{what.replace('_', ' ')}: {len(result[what])} keys, e.g. {result[what][0]}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_paths, render
    from .inspect import usermeta
    from .settings import load

    settings = load(args.data_dir) if args.data_dir else None
    jobs = args.jobs if args.jobs is not None else min(8, os.cpu_count() or 1)
    reports = inspect_paths(args.lora, checkpoint=args.checkpoint, weights=args.weights, settings=settings,
                            processes=jobs, progress=_progress_printer(not args.quiet and not args.json))
    if not reports:
        raise RecipeError(f"No LoRA files (.safetensors, .ckpt, .pt) found in {', '.join(args.lora)}.")
    failed = 0
    for rep in reports:
        if "error" in rep:
            failed += 1
        elif args.write_user_metadata:
            res = usermeta.write(rep["file"], activation_text=rep["trigger"] or "",
                                 preferred_weight=rep["max_safe_strength"] or None, arch=rep["architecture"])
            rep["user_metadata_written"] = res
        if args.json:
            print(json.dumps(rep, ensure_ascii=False), flush=True)
        else:
            print(render(rep, tags=args.tags), flush=True)
            if rep.get("user_metadata_written"):
                print(f"  wrote {rep['user_metadata_written']['path']}: {rep['user_metadata_written']['after']}\n")
    if not args.json and len(reports) > 1:
        kinds = {k: sum(r.get("kind") == k for r in reports) for k in ("passive", "trigger-dependent")}
        print(f"{len(reports)} files: {kinds['passive']} passive, {kinds['trigger-dependent']} trigger-dependent, "
              f"{failed} unreadable")
    if failed:
        print(f"error: {failed} of {len(reports)} file(s) could not be read (see above).", file=sys.stderr)
        return 2
    return 0


def _gen_settings(args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "cfg_scale": args.cfg_scale, "width": args.width, "height": args.height,
            "sampler_name": args.sampler, **({"scheduler": args.scheduler} if args.scheduler else {})}


def _read_prompts(path: str | None) -> list[str] | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the prompts file ({e.strerror}).") from None
    if not lines:
        raise RecipeError(f"{path}: no prompts (one per line; # starts a comment).")
    return lines


def cmd_grid(args: argparse.Namespace) -> int:
    from .gen.backend import HttpBackend
    from .gen.grid import build_spec, parse_seeds, run_grid
    from .settings import load

    be = HttpBackend(args.webui, args.api_auth)
    if args.resume:
        from .gen.grid import finish
        from .gen.run import Run, execute

        run = Run(args.resume)
        print(f"resuming {run.dir}: {len(run.missing())} of {len(run.cells)} image(s) to make", file=sys.stderr)
        execute(run, be, progress=_progress_printer(not args.quiet))
        res = finish(run)
        return _print_grid(res, args.json)
    if not args.prompt and not args.prompts:
        raise RecipeError("The grid needs a prompt.", fix="Give --prompt TEXT or --prompts FILE.")
    be.refresh()
    ck = args.checkpoint or be.current_checkpoint()
    ckpt_path = None
    if ck:
        from .gen.backend import resolve_name

        ckpt_path = resolve_name(ck, be.checkpoints(), "checkpoint").path
    spec, notes = build_spec(be.loras(), loras=args.lora or [], prompt=_read_prompts(args.prompts) or args.prompt,
                             negative_prompt=args.negative, strengths=args.strengths, epochs=args.epochs,
                             seeds=parse_seeds(args.seeds), checkpoint=args.checkpoint, checkpoint_path=ckpt_path,
                             settings=_gen_settings(args), inspector_settings=load(args.data_dir) if args.data_dir else None)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    res = run_grid(be, spec, args.out, notes=notes, progress=_progress_printer(not args.quiet))
    return _print_grid(res, args.json)


def _print_grid(res: dict, as_json: bool) -> int:
    res.pop("grid_image", None)
    if as_json:
        print(json.dumps(res, indent=2, default=str))
    else:
        for row, v in res["verdicts"].items():
            print(f"{row}: {v['case']} - {v['text']}")
        rec = res["record"]
        print(f"{rec['ok']} images ok, {rec['failed']} failed, {rec['missing']} missing, {rec['flagged']} flagged; "
              f"grid {res['grid']}; summary {res['summary']}")
        if rec["failed"] or rec["missing"]:
            print(f"run it again to fill the gaps: python -m lib_lorakit grid --webui URL --resume {res['run_dir']}")
    return 0 if res["record"]["failed"] == 0 and res["record"]["missing"] == 0 else 3


def cmd_autotest(args: argparse.Namespace) -> int:
    from .gen.autotest import AutotestOptions, run_autotest
    from .gen.backend import HttpBackend
    from .gen.grid import parse_seeds
    from .settings import load

    if not args.lora and not args.watch:
        raise RecipeError("Nothing to test.", fix="Give LoRA files or folders, and/or --watch FOLDER.")
    opts = AutotestOptions(negative_prompt=args.negative, strengths=args.strengths, seeds=parse_seeds(args.seeds),
                           checkpoint=args.checkpoint, settings=_gen_settings(args), epochs=args.epochs,
                           use_trigger=not args.no_trigger)
    prompts = _read_prompts(args.prompts)
    if prompts:
        opts.prompts = prompts
    be = HttpBackend(args.webui, args.api_auth)
    results = run_autotest(be, args.lora, args.out, opts, watch=args.watch, interval=args.interval,
                           watch_for=args.watch_for, log=lambda m: print(m, flush=True),
                           inspector_settings=load(args.data_dir) if args.data_dir else None)
    return 2 if any("error" in r for r in results) else 0


def cmd_triage(args: argparse.Namespace) -> int:
    from .eval import triage as tr
    from .eval.store import Store

    store = Store(args.data_dir)
    if args.action == "list":
        for t in store.triages():
            print(f"{t['id']}  {t['state']:<10} pass {t['pass']}  {t['name']}")
        return 0
    if args.action == "create":
        from .gen.backend import HttpBackend
        from .gen.grid import parse_seeds
        from .settings import load

        prompts = {}
        for item in args.prompt or []:
            cat, sep, text = item.partition("=")
            if not sep or not text.strip():
                raise RecipeError(f"--prompt {item!r}: write CATEGORY=PROMPT, e.g. style=a village street.")
            prompts[cat.strip()] = text.strip()
        be = HttpBackend(args.webui, args.api_auth)
        folder = os.path.abspath(args.folder) if args.folder else None
        t = tr.create_triage(store, be, folder=folder, checkpoint=args.checkpoint, prompts=prompts or None,
                             seeds=parse_seeds(args.seeds), strength=args.strength, negative_prompt=args.negative,
                             settings=_gen_settings(args), arch=args.arch, category=args.category,
                             name_filter=args.name, inspector_settings=load(args.data_dir), name=args.title or "")
        st = t.state()
        print(f"triage {t.id}: {st['items']} LoRAs, {st['skipped']} skipped", file=sys.stderr)
        for it in t.items:
            if it.get("skipped"):
                print(f"  skipped {it['lora']}: {it['skipped']}", file=sys.stderr)
        rec = tr.generate(t, be, args.out, progress=_progress_printer(True))
        print(t.id)
        print(f"{rec.get('ok', 0)} images ok, {rec.get('failed', 0)} failed; review it in the WebUI's Triage tab or "
              f"the standalone launcher (--data-dir {args.data_dir})", file=sys.stderr)
        return 0 if not rec.get("failed") and not rec.get("missing") else 3
    t = tr.Triage(store, args.id)
    if args.action == "decide":
        store.decide(t.id, [{"idx": args.idx, "decision": args.decision, "client": "cli"}])
        print(json.dumps(t.state()))
        return 0
    if args.action == "report":
        text = tr.report_csv(t) if args.csv else tr.report_markdown(t)
        if args.output:
            from .gen.run import _atomic_write
            from .formats.safetensors_io import check_output_path

            check_output_path(args.output, overwrite=args.overwrite)
            _atomic_write(args.output, text.encode())
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0
    if args.action == "archive":
        roots = [args.lora_root] if args.lora_root else ([t.rec["params"]["folder"]] if t.rec["params"].get("folder")
                                                         else [])
        res = tr.archive(t, args.archive_dir, roots, decision=args.decision)
        print(f"archived {res['loras']} LoRA(s), {res['files']} file(s), {res['bytes'] / 2**20:.1f} MB into "
              f"{res['batch']}; undo with: python -m lib_lorakit triage restore {res['batch']}")
        return 0
    raise RecipeError(f"unknown action {args.action}")


def cmd_triage_restore(args: argparse.Namespace) -> int:
    from .eval.triage import restore

    res = restore(args.batch)
    print(f"{res['state']}: {len(res['restored'])} file(s) back in place")
    for c in res["conflicts"]:
        print(f"  left in the archive (its original path is taken): {c}", file=sys.stderr)
    for m in res["missing"]:
        print(f"  missing from the archive: {m}", file=sys.stderr)
    return 0 if res["state"] == "restored" else 2


def cmd_tournament(args: argparse.Namespace) -> int:
    from .eval import tournament as T
    from .eval.store import Store

    tours = T.Tournaments(Store(args.data_dir))
    a = args.action
    if a == "list":
        for t in tours.list():
            print(f"{t['id']}  round {t['round']}  {t['state']:<10} {'revealed' if t['revealed'] else 'blind':<8} {t['name']}")
        return 0
    if a == "create":
        try:
            with open(args.spec, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise RecipeError(f"{args.spec}: cannot read the tournament spec ({e}).") from None
        spec = T.TournamentSpec(name=data.get("name", "tournament"),
                                candidates=[T.Candidate(**c) for c in data.get("candidates", [])],
                                prompts=[{"seed": 1000 + i, **p} for i, p in enumerate(data.get("prompts", []))],
                                settings=data.get("settings", {}), first_version=bool(data.get("first_version")))
        print(tours.create(spec))
        return 0
    if a == "generate":
        from .gen.backend import HttpBackend

        def build(c, name):
            if not args.models_dir:
                raise RecipeError(f"Candidate {c.id} is a merge: give --models-dir (the WebUI's checkpoint folder).")
            from .merge import ModelSpec, merge

            def path_of(n):
                p = n if os.path.isabs(n) else os.path.join(args.models_dir, n)
                return p if os.path.exists(p) else p + ".safetensors"

            out = os.path.join(args.models_dir, name + ".safetensors")
            if not os.path.exists(out):
                merge([ModelSpec(path_of(m["name"]), float(m.get("weight", 1.0))) for m in c.merge["models"]], out,
                      method=c.merge.get("method", "weighted"),
                      base=path_of(c.merge["base"]) if c.merge.get("base") else None,
                      blocks=c.merge.get("blocks") or None)
            return name

        be = HttpBackend(args.webui, args.api_auth)
        rec = T.generate(tours, args.id, be, args.out, build_merge=build, progress=_progress_printer(True))
        print(f"{rec['ok']} images ok, {rec['failed']} failed, {rec['missing']} missing; rank them blind in the "
              f"Tournament tab or the standalone launcher (--data-dir {args.data_dir})")
        return 0 if rec["failed"] == 0 and rec["missing"] == 0 else 3
    if a == "score":
        sc = T.scores(tours, args.id)
        if args.json:
            print(json.dumps(sc, indent=2, default=str))
            return 0
        for name, vals in sc["schemes"].items():
            print(f"{name}: " + ", ".join(f"{c} {v:.2f}" for c, v in sorted(
                vals.items(), key=lambda kv: kv[1], reverse=name != "average rank")))
        for n in sc["notes"]:
            print(f"note: {n}")
        if sc["separability"].get("text"):
            print(sc["separability"]["text"])
        return 0
    if a == "reveal":
        tours.update(args.id, revealed=1)
        print(f"{args.id} revealed")
        return 0
    if a == "report":
        text = T.report_csv(tours, args.id) if args.csv else T.report_markdown(tours, args.id)
        if args.sheets:
            os.makedirs(args.sheets, exist_ok=True)
            for p in range(len(tours.spec(args.id).prompts)):
                out = os.path.join(args.sheets, f"prompt-{p + 1:02d}.png")
                if os.path.exists(out) and not args.overwrite:
                    raise RecipeError(f"{out} exists.", fix="Pass --overwrite or another --sheets folder.")
                T.contact_sheet(tours, args.id, p).save(out)
            print(f"contact sheets in {args.sheets}", file=sys.stderr)
        if args.output:
            from .formats.safetensors_io import check_output_path
            from .gen.run import _atomic_write

            check_output_path(args.output, overwrite=args.overwrite)
            _atomic_write(args.output, text.encode())
        else:
            sys.stdout.write(text)
        return 0
    if a == "next-round":
        prop = T.propose_next(tours, args.id, args.mode, step=args.step)
        if args.create:
            spec = T.TournamentSpec(name=f"{tours.get(args.id)['name']} r{prop['round']}",
                                    candidates=[T.Candidate(**c) for c in prop["candidates"]], prompts=prop["prompts"],
                                    settings=prop["settings"], first_version=prop["first_version"])
            prop["id"] = tours.create(spec, parent=args.id, round_no=prop["round"])
        print(json.dumps(prop, indent=2))
        return 0
    raise RecipeError(f"unknown action {a}")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dir, arch=args.arch, keep=args.keep)


def cmd_ui(args: argparse.Namespace) -> int:
    from .ui.standalone import serve

    serve(args.models_dir, args.loras_dir, port=args.port, host=args.host, api_auth=args.api_auth,
          data_dir=args.data_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lib_lorakit", description="lorakit: bake LoRA recipes into SD1.5/SDXL checkpoints.")
    p.add_argument("--version", action="version", version=f"lorakit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details (and tracebacks) to stderr")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("bake", help="write a LoRA recipe permanently into a checkpoint",
                       description="Bake LoRA/LyCORIS files into a checkpoint. Maths in fp32, one rounding to the "
                                   "save dtype; a LoRA layer that matches nothing is an error.")
    b.add_argument("base", help="base checkpoint (.safetensors; .ckpt/.pt read weights-only)")
    b.add_argument("--lora", action="append", metavar="PATH[:STRENGTH[:TE_STRENGTH]]",
                   help="a LoRA and its strength (default 1); TE_STRENGTH for the text encoders (default STRENGTH). "
                        "Repeat for a recipe.")
    b.add_argument("-o", "--output", help="output .safetensors (refused if it exists, unless --overwrite)")
    b.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="default fp16")
    b.add_argument("--blocks", action="append", metavar="PATH=PRESET_OR_VECTOR",
                   help="per-block weights for one LoRA: a LoRA Block Weight preset (INALL, OUTALL, ...) or vector "
                        "(17/26 values SD1.5, 12/20 SDXL), or named 'IN04=0.5,OUT05=0'")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output")
    b.add_argument("--allow-unmatched", action="store_true",
                   help="bake what matches and list unmatched LoRA layers in the report instead of failing")
    b.add_argument("--dry-run", action="store_true", help="check and plan everything, write nothing")
    b.add_argument("--report", metavar="FILE", help="write the full report as JSON")
    b.add_argument("--json", action="store_true", help="print the report as JSON instead of a summary")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    engineopts.add_cli_args(b)
    b.set_defaults(func=cmd_bake)

    m = sub.add_parser("merge", help="merge checkpoints: weighted, add-difference, TIES, DARE, slerp",
                       description="Merge N checkpoints in fp32 with one rounding, streaming. The VAE is never "
                                   "averaged: it is copied from one source.")
    m.add_argument("--model", action="append", required=True, metavar="PATH[:WEIGHT]",
                   help="an ingredient and its weight; the first is the primary. Add-difference: A, then B:w")
    m.add_argument("--method", choices=("weighted", "add-difference", "ties", "dare", "slerp"), default="weighted")
    m.add_argument("--base", metavar="PATH", help="C for add-difference (A + w(B - C)), TIES and DARE")
    m.add_argument("--blocks", metavar="PRESET_OR_VECTOR",
                   help="per-block factors on the non-primary contributions (SuperMerger block order: BASE,IN00..,"
                        "M00,OUT..); with the second model at weight 1 a vector is SuperMerger's per-block alpha")
    m.add_argument("--vae-from", metavar="N|PATH", help="copy the VAE from model N (default 1) or a VAE file")
    m.add_argument("--te-from", metavar="N", help="copy the text encoders from model N instead of merging them")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    m.add_argument("--no-normalize", action="store_true", help="use the weights as given (default: scale to sum 1)")
    m.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each difference kept (0.2)")
    m.add_argument("--drop", type=float, default=0.5, help="DARE: fraction of each difference dropped (0.5)")
    m.add_argument("--seed", type=int, default=0, help="DARE: random seed")
    m.add_argument("--scale", type=float, default=1.0, help="TIES/DARE: scale of the merged difference")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--report", metavar="FILE")
    m.add_argument("--json", action="store_true")
    m.add_argument("-q", "--quiet", action="store_true")
    engineopts.add_cli_args(m)
    m.set_defaults(func=cmd_merge)

    df = sub.add_parser("diff", help="where does B differ from A: relative change and cosine per block")
    df.add_argument("a")
    df.add_argument("b")
    df.add_argument("--chart", metavar="PNG", help="also write a bar chart")
    df.add_argument("--json", action="store_true")
    df.add_argument("-q", "--quiet", action="store_true")
    df.set_defaults(func=cmd_diff)

    i = sub.add_parser("inspect", help="what a LoRA really is: family, network, real trigger, kind, category, "
                                        "max-safe strength",
                       description="Inspect LoRA files (folders are scanned recursively). Reads headers only, "
                                   "unless --weights asks for per-block weight statistics.")
    i.add_argument("lora", nargs="+", help="LoRA files or folders")
    i.add_argument("--checkpoint", metavar="CKPT",
                   help="the checkpoint it will be used with: family checks and cross-lineage ceilings (its header "
                        "only); with --weights, ‖ΔW‖/‖W‖ per block")
    i.add_argument("--weights", action="store_true",
                   help="per-block ‖ΔW‖ at strength 1, relative to --checkpoint's weights when given (reads tensors)")
    i.add_argument("--json", action="store_true", help="one JSON object per file, one per line")
    i.add_argument("--tags", type=int, default=12, help="tags shown per training folder (12)")
    i.add_argument("--data-dir", metavar="DIR",
                   help="lorakit's data folder, for the edited max-safe strength table (settings.json)")
    i.add_argument("--write-user-metadata", action="store_true",
                   help="write the trigger and max-safe strength into each LoRA's <name>.json (the WebUI's "
                        "'activation text' and 'preferred weight'), keeping its other fields")
    i.add_argument("--jobs", type=int, metavar="N",
                   help="worker processes for large folders (default: CPU cores, at most 8; 1 = none)")
    i.add_argument("-q", "--quiet", action="store_true")
    i.set_defaults(func=cmd_inspect)

    u = sub.add_parser("ui", help="serve the lorakit tab and /lorakit/v1 API locally, without a WebUI")
    u.add_argument("--models-dir", required=True, help="checkpoint folder (the host's Stable-diffusion folder)")
    u.add_argument("--loras-dir", required=True, help="LoRA folder")
    u.add_argument("--port", type=int, default=7870)
    u.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    u.add_argument("--api-auth", help="require user:password[,user2:password2] for the API, like the WebUI's option")
    u.add_argument("--data-dir", help="lorakit's data folder (settings, triage decisions); default "
                                      "MODELS_DIR/.lorakit — give the CLI's --data-dir to review its triages here")
    u.set_defaults(func=cmd_ui)

    def gen_args(x: argparse.ArgumentParser) -> None:
        x.add_argument("--webui", required=True, metavar="URL", help="a WebUI started with --api, e.g. http://127.0.0.1:7860")
        x.add_argument("--api-auth", metavar="USER:PASSWORD", help="the WebUI's --api-auth credentials")
        x.add_argument("--checkpoint", help="checkpoint from the WebUI's list (default: the loaded one; restored after "
                                            "each image)")
        x.add_argument("--strengths", help="'0, 0.25, 0.5' or '0-1.5:0.25' (default: 0 up to each LoRA's max-safe "
                                           "strength from the inspector); 0, the baseline, is always in")
        x.add_argument("--seeds", help="'1, 2, 3' or '3x' (default 1)")
        x.add_argument("--epochs", action="store_true", help="rows are the epoch files of each LoRA's training run")
        x.add_argument("--prompts", metavar="FILE", help="prompts, one per line")
        x.add_argument("--negative", default="", help="negative prompt")
        x.add_argument("--steps", type=int, default=20)
        x.add_argument("--cfg-scale", type=float, default=7.0)
        x.add_argument("--width", type=int, default=512)
        x.add_argument("--height", type=int, default=512)
        x.add_argument("--sampler", default="Euler a")
        x.add_argument("--scheduler", help="scheduler (A1111 1.9+/Forge), e.g. Karras")
        x.add_argument("--data-dir", metavar="DIR", help="lorakit's data folder (edited max-safe strength table)")

    g = sub.add_parser("grid", help="LoRA strength grid through a running WebUI",
                       description="Generate a LoRA strength grid through a WebUI's API: a baseline column at 0, one "
                                   "row per LoRA (or epoch), a verdict per row. Writes a run folder with every "
                                   "image, its manifest, grid.png and summary.md. Exit 3 when images failed.")
    g.add_argument("--lora", action="append", metavar="NAME", help="a LoRA from the WebUI's list (repeat); default: "
                                                                  "those tagged in the prompt")
    g.add_argument("--prompt", default="", help="the prompt (tags of the tested LoRAs are set per cell)")
    gen_args(g)
    g.add_argument("--out", default="lorakit-runs", help="folder for run folders (default ./lorakit-runs)")
    g.add_argument("--resume", metavar="RUN_DIR", help="make only the missing or failed images of an earlier run "
                                                      "(its plan is kept; other options are ignored)")
    g.add_argument("--json", action="store_true")
    g.add_argument("-q", "--quiet", action="store_true")
    g.set_defaults(func=cmd_grid)

    a = sub.add_parser("autotest", help="strength grid for each new LoRA (or epoch) through a WebUI; --watch a folder",
                       description="For each LoRA file (or each file appearing in --watch FOLDER once complete): "
                                   "inspect it, run a strength grid through the WebUI over several prompts (its "
                                   "trigger added, baseline included), and write the grid, the verdict and a "
                                   "markdown summary into its run folder. Files already tested are skipped.")
    a.add_argument("lora", nargs="*", help="LoRA files or folders (inside the WebUI's LoRA folders)")
    gen_args(a)
    a.add_argument("--watch", metavar="FOLDER", help="keep testing new complete files that appear here")
    a.add_argument("--interval", type=float, default=10.0, help="seconds between looks at --watch (default 10)")
    a.add_argument("--watch-for", type=float, metavar="SECONDS", help="stop watching after this long (default: never)")
    a.add_argument("--no-trigger", action="store_true", help="do not add the inspector's trigger to the prompts")
    a.add_argument("--out", default="lorakit-runs", help="folder for run folders and the state file (default ./lorakit-runs)")
    a.set_defaults(func=cmd_autotest)

    t = sub.add_parser("triage", help="keep/maybe/drop many LoRAs: image pairs, decisions, report, archive",
                       description="LoRA triage: one image per LoRA at its max-safe strength beside a no-LoRA "
                                   "baseline; decisions in the WebUI's Triage tab (or the standalone launcher); a "
                                   "report; a reversible archive of the NO files.")
    tsub = t.add_subparsers(dest="action", required=True, parser_class=_Parser)

    def data(x):
        x.add_argument("--data-dir", default="lorakit-data", help="lorakit's data folder with lorakit.db "
                                                                  "(default ./lorakit-data; the WebUI's is "
                                                                  "extensions/lorakit's data folder)")

    tc = tsub.add_parser("create", help="plan a triage of a LoRA folder and generate its pairs through a WebUI")
    tc.add_argument("--folder", help="a folder inside the WebUI's LoRA folder (default: every LoRA it lists)")
    tc.add_argument("--arch", choices=("sd15", "sdxl"))
    tc.add_argument("--category", help="only this inspector category")
    tc.add_argument("--name", help="only LoRAs whose name matches (substring or regular expression)")
    tc.add_argument("--strength", type=float, help="override every LoRA's max-safe strength")
    tc.add_argument("--prompt", action="append", metavar="CATEGORY=PROMPT", help="prompt for a category (repeat)")
    tc.add_argument("--title", help="a name for the triage")
    gen_args(tc)
    tc.set_defaults(data_dir="lorakit-data")
    tc.add_argument("--out", default="lorakit-runs", help="folder for the run folder (default ./lorakit-runs)")
    tl = tsub.add_parser("list", help="triage sessions")
    tr_ = tsub.add_parser("report", help="markdown (or --csv) report")
    tr_.add_argument("id")
    tr_.add_argument("--csv", action="store_true")
    tr_.add_argument("-o", "--output", help="write to this file (refused if it exists, unless --overwrite)")
    tr_.add_argument("--overwrite", action="store_true")
    td = tsub.add_parser("decide", help="record one decision")
    td.add_argument("id")
    td.add_argument("idx", type=int)
    td.add_argument("decision", choices=("yes", "maybe", "no", "clear"))
    ta = tsub.add_parser("archive", help="move the NO LoRAs and their sidecars into an archive folder (reversible)")
    ta.add_argument("id")
    ta.add_argument("--archive-dir", required=True, help="where archive batches go (outside the LoRA folders)")
    ta.add_argument("--lora-root", help="the LoRA folder (archived paths keep their place below it)")
    ta.add_argument("--decision", default="no", choices=("no", "maybe", "yes"))
    for x in (tl, tr_, td, ta):
        data(x)
        x.set_defaults(func=cmd_triage)
    tc.set_defaults(func=cmd_triage)
    trs = tsub.add_parser("restore", help="put an archive batch back, byte for byte (never overwrites)")
    trs.add_argument("batch", help="the batch folder printed by archive")
    trs.set_defaults(func=cmd_triage_restore)

    to = sub.add_parser("tournament", help="blind tournaments of checkpoints, recipes and merges",
                        description="Blind tournaments: at least 5 prompts, one control (the previous version), hidden "
                                    "labels, top-3 ranking, scores under several schemes with uncertainty, rounds.")
    tosub = to.add_subparsers(dest="action", required=True, parser_class=_Parser)
    t_create = tosub.add_parser("create", help="create from a JSON spec {name, candidates, prompts, settings}")
    t_create.add_argument("spec")
    t_gen = tosub.add_parser("generate", help="build merge candidates and generate the images through a WebUI")
    t_gen.add_argument("id")
    t_gen.add_argument("--webui", required=True, metavar="URL")
    t_gen.add_argument("--api-auth", metavar="USER:PASSWORD")
    t_gen.add_argument("--models-dir", help="the WebUI's checkpoint folder on this machine (where merges are built)")
    t_gen.add_argument("--out", default="lorakit-runs", help="folder for the run folder (default ./lorakit-runs)")
    t_score = tosub.add_parser("score", help="scores under every scheme (blind until revealed)")
    t_score.add_argument("id")
    t_score.add_argument("--json", action="store_true")
    t_rev = tosub.add_parser("reveal", help="reveal who is who")
    t_rev.add_argument("id")
    t_rep = tosub.add_parser("report", help="markdown (or --csv) report, after reveal")
    t_rep.add_argument("id")
    t_rep.add_argument("--csv", action="store_true")
    t_rep.add_argument("-o", "--output")
    t_rep.add_argument("--overwrite", action="store_true")
    t_rep.add_argument("--sheets", metavar="DIR", help="also write a contact sheet per prompt into DIR")
    t_next = tosub.add_parser("next-round", help="propose the next round from the winner (narrow or dial-in)")
    t_next.add_argument("id")
    t_next.add_argument("--mode", choices=("narrow", "dial-in"), default="narrow")
    t_next.add_argument("--step", type=float, default=0.1)
    t_next.add_argument("--create", action="store_true", help="create the proposed round")
    t_list = tosub.add_parser("list", help="tournaments")
    for x in (t_create, t_gen, t_score, t_rev, t_rep, t_next, t_list):
        x.add_argument("--data-dir", default="lorakit-data", help="lorakit's data folder (default ./lorakit-data)")
        x.set_defaults(func=cmd_tournament)

    d = sub.add_parser("demo", help="build a small demo workspace (real key layout, tiny sizes) and bake it")
    d.add_argument("--dir", default="lorakit-demo", help="workspace folder (default ./lorakit-demo)")
    d.add_argument("--arch", choices=("sdxl", "sd15"), default="sdxl")
    d.add_argument("--keep", action="store_true", help="reuse an existing workspace's inputs")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    # SIGTERM behaves like Ctrl-C: the same cleanup runs and no partial output remains.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return args.func(args)
    except LorakitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from .formats.safetensors_io import cleanup_temps

        cleanup_temps()
        print("\ninterrupted; no output was written", file=sys.stderr)
        return 130
    except Exception:
        print("lorakit failed unexpectedly; please report this with the traceback below.", file=sys.stderr)
        traceback.print_exc()
        return 1
