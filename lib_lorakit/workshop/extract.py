"""Extract a LoRA from two checkpoints: the truncated SVD of (tuned − base), layer by layer.

The output is a kohya LoRA (``lora_unet_…``/``lora_te1_…``/``lora_te2_…``, ``alpha`` = rank, so the
scale is 1) covering the modules kohya's ``networks/lora.py`` trains (see :mod:`.modules`); SDXL's
CLIP-G q/k/v are three row slices of the fused ``in_proj_weight``, each factored on its own.
Differences are taken in float32; layers of one shape are stacked and factored together by
:func:`.svd.factor_batch` (randomized where it settles, exact otherwise; float64 Rayleigh–Ritz at
the end). Unlike kohya's script no value is clamped, so the error per layer is the truncated SVD's.

The pipeline: reader threads read each layer of both files into a few reusable buffers (pinned
for a GPU, whose copies are then asynchronous); the main thread takes the float32 difference on
the device and holds it in a per-shape pending stack; when the pending stacks pass a byte budget
(``BATCH_BYTES_CPU``, or on a GPU a share of its free memory up to ``BATCH_BYTES_GPU``) the
largest is factored as one batch, and all of them at the end. Memory stays flat: the buffers,
the budget and the (small) LoRA held until it is written. ``report["profile"]`` gives the
seconds per stage (read, wait read, diff, factor, to host).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time

import torch

from ..errors import ArchitectureError, FormatError, RecipeError
from ..formats.arch import ARCHS, detect_checkpoint
from ..formats.safetensors_io import save_file
from ..formats.sources import TensorSource, open_source
from ..streaming import Hasher, Profile, exact_float32, peak_rss_mb, usable_cores, worker_count
from . import svd
from .common import (
    Cancel,
    Progress,
    block_filter,
    check_cancel,
    check_output,
    check_rank,
    keep_module,
    lora_modelspec,
    no_progress,
    resolve_device,
    save_dtype,
)
from .modules import Module, kohya_modules

READ_THREADS = 6  # with a GPU; 2 when the CPU does the maths
SPARE_SLOTS = 2
READ_AHEAD = 12  # chunks announced to the kernel ahead of the readers
CHUNK_BYTES = 16 << 20  # per file and read: the read buffers stay small (pinned memory is resident)
BATCH_BYTES_CPU = 64 << 20
BATCH_BYTES_GPU = 256 << 20  # larger batches gain little and leave more work after the last read


def _open_pair(tuned: str, base: str) -> tuple[TensorSource, TensorSource, str]:
    t = open_source(tuned)
    try:
        b = open_source(base)
    except BaseException:
        t.close()
        raise
    try:
        fam = detect_checkpoint(t.shapes(), t.metadata, tuned)
        famb = detect_checkpoint(b.shapes(), b.metadata, base)
        if fam.arch not in ARCHS:
            raise ArchitectureError(
                f"{tuned}: not recognised as an SD1.5 or SDXL checkpoint.",
                fix="Give a full SD1.5 or SDXL checkpoint (UNet and text encoders).",
            )
        if famb.arch != fam.arch:
            raise ArchitectureError(
                f"The tuned model is {fam.label}, the base {famb.label}: a LoRA can only be "
                f"extracted between two models of one family.",
                fix="Pick a base of the tuned model's family.",
            )
    except BaseException:
        t.close()
        b.close()
        raise
    return t, b, fam.arch


class _Slot:
    """A reusable read buffer for one chunk of rows of both files (pinned when the maths runs on a GPU)."""

    def __init__(self, nbytes: int, dev: torch.device):
        pin = dev.type == "cuda"
        self.t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.b = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.event = torch.cuda.Event() if pin else None
        self.dev = dev

    def wait(self) -> None:
        """Block until the device has finished copying out of this buffer."""
        if self.event is not None:
            self.event.synchronize()


def _chunks(mods: list[Module], t: TensorSource) -> list[tuple[int, int, int]]:
    """(module index, first row, end row) pieces of at most ``CHUNK_BYTES`` per file (a row at least)."""
    out = []
    for i, m in enumerate(mods):
        r0, r1 = m.rows or (0, m.shape[0])
        row_bytes = max(1, t.nbytes(m.key) // max(1, t.shape(m.key)[0]))
        step = max(1, CHUNK_BYTES // row_bytes)
        out.extend((i, a, min(a + step, r1)) for a in range(r0, r1, step))
    return out


class _Readers:
    """Threads that read row chunks of (tuned, base) of each module into free slots, in any order."""

    def __init__(self, mods: list[Module], t: TensorSource, b: TensorSource, dev: torch.device, profile: Profile):
        self.mods, self.t, self.b, self.profile = mods, t, b, profile
        self.work = _chunks(mods, t)
        nbytes = 0
        for i, r0, r1 in self.work:
            key = mods[i].key
            rows = max(1, t.shape(key)[0])
            nbytes = max(nbytes, max(t.nbytes(key), b.nbytes(key)) // rows * (r1 - r0))
        n = max(1, min(read_threads(dev), len(self.work)))
        self.free: queue.Queue = queue.Queue()
        for _ in range(n + SPARE_SLOTS):
            self.free.put(_Slot(nbytes, dev))
        self.out: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self._next = iter(self.work)
        self._pos = 0
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, name=f"lorakit-extract-read_{i}", daemon=True) for i in range(n)
        ]
        for th in self.threads:
            th.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                with self._lock:
                    job = next(self._next, None)
                    ahead = self._pos + READ_AHEAD
                    self._pos += 1
                if job is None:
                    break
                if ahead < len(self.work):
                    self._advise(self.work[ahead])
                slot = None
                while slot is None and not self.stop.is_set():
                    try:
                        slot = self.free.get(timeout=0.2)
                    except queue.Empty:
                        continue
                if slot is None:
                    break
                slot.wait()
                i, r0, r1 = job
                key = self.mods[i].key
                t0 = time.perf_counter()
                pair = (self.t.read_rows(key, r0, r1, slot.t), self.b.read_rows(key, r0, r1, slot.b))
                self.profile.add("read", time.perf_counter() - t0)
                self.out.put((job, slot, pair))
        except BaseException as e:  # surfaced in the main thread
            self.out.put(e)
        finally:
            self.out.put(None)

    def _advise(self, job: tuple[int, int, int]) -> None:
        """Tell the kernel a later chunk is wanted (cold reads then reach the disk several at a time)."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        i, r0, r1 = job
        key = self.mods[i].key
        for src in (self.t, self.b):
            span = src.raw_span(key)
            if span is None:
                continue
            fd, start, nbytes = span
            row = nbytes // max(1, src.shape(key)[0])
            try:
                advise(fd, start + r0 * row, (r1 - r0) * row, os.POSIX_FADV_WILLNEED)
            except OSError:
                return

    def items(self):
        """Yield ((index, r0, r1), slot, (tuned rows, base rows)) until every thread is done;
        give each slot back with :meth:`release`."""
        running = len(self.threads)
        while running:
            t0 = time.perf_counter()
            item = self.out.get()
            self.profile.add("wait read", time.perf_counter() - t0)
            if item is None:
                running -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, slot: _Slot) -> None:
        if slot.event is not None:  # after the copies queued on the device's stream (cuda:N too)
            slot.event.record(torch.cuda.current_stream(slot.dev))
        self.free.put(slot)

    def close(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(timeout=30)


def read_threads(dev: torch.device) -> int:
    """Reader threads: a few (the disk wants several requests in flight), never more than the cores;
    fewer when the CPU does the maths (the reads are then not the critical path)."""
    return max(1, min(READ_THREADS if dev.type == "cuda" else 2, usable_cores()))


@contextlib.contextmanager
def _maths_threads(dev: torch.device):
    """torch's intra-op pool while the extraction runs, restored afterwards: on the CPU every core
    but one (the readers'), the batched products are its work; with a GPU one thread (the host
    only reads, copies and solves small eigenproblems, which threads only slow down)."""
    before = torch.get_num_threads()
    torch.set_num_threads(worker_count() if dev.type == "cpu" else 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batch_budget(dev: torch.device) -> int:
    """Bytes of float32 differences to stack before factoring (the batch; the maths takes ~4x that)."""
    if dev.type != "cuda":
        return BATCH_BYTES_CPU
    free, _ = torch.cuda.mem_get_info(dev)
    return int(max(64 << 20, min(BATCH_BYTES_GPU, free // 8)))


def extract(
    tuned: str,
    base: str,
    output: str | None,
    *,
    rank: int = 32,
    conv_rank: int | None = None,
    dynamic: str | None = None,
    min_diff: float = 0.0,
    blocks: str | None = None,
    device: str = "auto",
    save: str = "fp16",
    method: str = "auto",
    hash_inputs: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> dict:
    """Extract a LoRA of (tuned − base) and write it to ``output`` (kohya format, safetensors).

    Args:
        rank: rank of linear and 1x1 layers (the cap with ``dynamic``).
        conv_rank: rank of 3x3 convolutions; None or 0 leaves convolutions out (as kohya without conv_dim).
        dynamic: ``sv_fro:F``, ``sv_ratio:N`` or ``sv_cumulative:F`` (resize_lora.py's rules), or None.
        min_diff: layers whose largest absolute difference is at or below this are skipped and listed.
        blocks: keep only these components/blocks (``unet``, ``te1``, ``IN04``, …), comma-separated.
        device: ``auto``, ``cpu`` or ``cuda``.
        save: dtype of the LoRA: fp16, bf16 or fp32.
        method: ``auto`` (randomized where it settles) or ``exact`` (full SVD of every layer).
        output: None runs everything but writes nothing (a dry run).

    Returns:
        The report: per module rank, kept energy and relative error; skipped layers; timings.
    """
    t0 = time.perf_counter()
    say = progress or no_progress
    check_rank(rank)
    check_rank(conv_rank, "conv rank", allow_zero=True)
    dyn = svd.parse_dynamic(dynamic)
    dt = save_dtype(save)
    if method not in ("auto", "exact"):
        raise RecipeError(f"Unknown SVD method {method!r}.", fix="Use auto or exact.")
    if not min_diff >= 0:
        raise RecipeError(f"The minimum difference {min_diff!r} must be 0 or more.", fix="Use for example 0.0001.")
    dev = resolve_device(device)
    if output is not None:
        output = check_output(output, [tuned, base], overwrite)
    with _maths_threads(dev), exact_float32(dev):
        return _extract(
            tuned,
            base,
            output,
            rank,
            conv_rank,
            dynamic,
            dyn,
            min_diff,
            blocks,
            dev,
            dt,
            method,
            hash_inputs,
            overwrite,
            say,
            cancel,
            t0,
        )


def _extract(
    tuned,
    base,
    output,
    rank,
    conv_rank,
    dynamic,
    dyn,
    min_diff,
    blocks,
    dev,
    dt,
    method,
    hash_inputs,
    overwrite,
    say,
    cancel,
    t0,
) -> dict:
    t, b, arch = _open_pair(tuned, base)
    hashers: list[Hasher] = []
    try:
        st, sb = t.shapes(), b.shapes()
        sel = block_filter(blocks, arch)
        mods = [
            m for m in kohya_modules(st, ARCHS[arch], conv=bool(conv_rank)) if keep_module(sel, m.component, m.block)
        ]
        for m in mods:
            if m.key not in sb:
                raise FormatError(
                    f"{base}: has no tensor {m.key!r}, which the tuned model has.",
                    fix="Give the base model the tuned model was trained from (same family, full model).",
                )
            if tuple(sb[m.key]) != tuple(st[m.key]):
                raise FormatError(
                    f"{m.key}: shape {list(st[m.key])} in the tuned model, {list(sb[m.key])} in the base.",
                    fix="Give the base model the tuned model was trained from.",
                )
        if not mods:
            raise RecipeError("No layer to extract with these blocks.", fix="Widen the block selection.")
        if hash_inputs and output is not None:
            hashers = [Hasher(os.fspath(p)) for p in (tuned, base)]
            for h in hashers:
                h.start()
        profile = Profile()
        readers = _Readers(mods, t, b, dev, profile)
        budget = _batch_budget(dev)
        results: dict[int, tuple[torch.Tensor, torch.Tensor, dict] | float] = {}
        pending: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        pending_bytes = 0
        total = len(mods)
        done = 0
        say(0, total, "extracting")

        def flush(group: tuple) -> None:
            nonlocal pending_bytes, done
            items = pending.pop(group)
            group_idx = [i for i, _, _ in items]
            pending_bytes -= sum(d.nbytes for _, d, _ in items)
            r = group[2]
            t1 = time.perf_counter()
            peaks = torch.stack([p for _, _, p in items]).tolist()  # one device round trip for the batch
            keep = [j for j, pk in enumerate(peaks) if pk > min_diff]
            for j, pk in enumerate(peaks):
                if pk <= min_diff:
                    results[items[j][0]] = pk
            if keep:
                stack = torch.stack([items[j][1] for j in keep])
                del items[:]  # the stack holds the differences now
                fs = svd.factor_batch(stack, r, dyn, method=method)
                del stack
                profile.add("factor", time.perf_counter() - t1)
                t1 = time.perf_counter()
                flat = torch.cat([x.reshape(-1) for f in fs for x in (f.up, f.down)]).to("cpu", dt)
                pos = 0
                for j, f in zip(keep, fs):  # one device round trip for the batch's factors
                    parts = []
                    for x in (f.up, f.down):
                        parts.append(flat[pos : pos + x.numel()].view(x.shape).clone())
                        pos += x.numel()
                    # the float32 factors go now: only the saved dtype's copy and the figures stay
                    figs = {"rank": f.rank, "kept": f.kept, "rel_err": f.rel_err, "method": f.method}
                    results[group_idx[j]] = (parts[0], parts[1], figs)
                del fs
                del flat
                profile.add("to host", time.perf_counter() - t1)
            for j in range(len(peaks)):
                done += 1
                idx = group_idx[j]
                res = results[idx]
                m = mods[idx]
                if isinstance(res, float):
                    say(done, total, f"{m.name}: unchanged, skipped")
                else:
                    say(done, total, f"{m.name}: rank {res[2]['rank']}, kept {res[2]['kept']:.1%}")

        building: dict[int, list] = {}  # module index -> [float32 difference, rows still to come]
        try:
            for (idx, r0, r1), slot, (wt, wb) in readers.items():
                check_cancel(cancel, "Extraction")
                t1 = time.perf_counter()
                m = mods[idx]
                entry = building.get(idx)
                if entry is None:
                    entry = building[idx] = [torch.empty(m.shape[0], wt.shape[1], device=dev), m.shape[0]]
                base_row = m.rows[0] if m.rows else 0
                part = entry[0][r0 - base_row : r1 - base_row]
                part.copy_(wt.to(dev, non_blocking=True))
                part.sub_(wb.to(dev, non_blocking=True))
                readers.release(slot)
                del wt, wb, part
                entry[1] -= r1 - r0
                if entry[1]:
                    profile.add("diff", time.perf_counter() - t1)
                    continue
                mat = building.pop(idx)[0]
                r = conv_rank if m.kind == "conv" else rank
                r = max(1, min(r, mat.shape[0], mat.shape[1]))
                peak = mat.abs().amax() if mat.numel() else torch.zeros((), device=dev)
                pending.setdefault((tuple(mat.shape), m.kind == "conv", r), []).append((idx, mat, peak))
                pending_bytes += mat.nbytes
                profile.add("diff", time.perf_counter() - t1)
                del mat, entry, peak  # the pending stack holds it now
                while pending_bytes > budget:
                    flush(max(pending, key=lambda g: sum(d.nbytes for _, d, _ in pending[g])))
            for group in list(pending):
                check_cancel(cancel, "Extraction")
                flush(group)
        finally:
            readers.close()
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, dict] = {}
        skipped: list[dict] = []
        methods: dict[str, int] = {}
        for idx, m in enumerate(mods):
            res = results[idx]
            if isinstance(res, float):
                skipped.append({"module": m.name, "key": m.key, "max_abs_diff": res})
                continue
            up, down, f = res
            k = f["rank"]
            if len(m.shape) == 4:
                up = up.reshape(m.shape[0], k, 1, 1)
                down = down.reshape(k, *m.shape[1:])
            tensors[m.name + ".lora_up.weight"] = up.contiguous()
            tensors[m.name + ".lora_down.weight"] = down.contiguous()
            tensors[m.name + ".alpha"] = torch.tensor(float(k), dtype=dt)
            layers[m.name] = {
                "key": m.key,
                "rows": list(m.rows) if m.rows else None,
                "rank": k,
                "kept": round(f["kept"], 6),
                "rel_err": round(f["rel_err"], 6),
                "method": f["method"],
            }
            methods[f["method"]] = methods.get(f["method"], 0) + 1
        results.clear()
        if not layers:
            raise RecipeError(
                f"{tuned} and {base} do not differ on any of the {total} layers a LoRA covers "
                f"(largest difference at most {min_diff:g}).",
                fix="Check that the first model is the fine-tune and the second its base, or lower the minimum difference.",
            )
        report = {
            "tuned": os.fspath(tuned),
            "base": os.fspath(base),
            "output": output,
            "arch": arch,
            "rank": rank,
            "conv_rank": conv_rank or 0,
            "dynamic": dynamic or "",
            "min_diff": min_diff,
            "device": str(dev),
            "modules": len(layers),
            "skipped": skipped,
            "layers": layers,
            "methods": methods,
        }
        if output is not None:
            for h in hashers:
                h.join()
            title = os.path.splitext(os.path.basename(output))[0]
            meta = lora_modelspec(arch, title)
            net_args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if conv_rank else {}
            meta.update(
                {
                    "ss_network_dim": "Dynamic" if dyn else str(rank),
                    "ss_network_alpha": "Dynamic" if dyn else str(float(rank)),
                    "ss_network_args": json.dumps(net_args),
                    "ss_training_comment": f"extracted from {os.path.basename(tuned)} - {os.path.basename(base)}",
                    "lorakit.extract": json.dumps(
                        {
                            "tuned": os.path.basename(tuned),
                            "base": os.path.basename(base),
                            "tuned_sha256": hashers[0].digest if hashers else "",
                            "base_sha256": hashers[1].digest if hashers else "",
                            "rank": rank,
                            "conv_rank": conv_rank or 0,
                            "dynamic": dynamic or "",
                            "min_diff": min_diff,
                            "skipped": [s["module"] for s in skipped],
                            "layers": {n: [v["rank"], v["kept"], v["rel_err"]] for n, v in layers.items()},
                        },
                        separators=(",", ":"),
                    ),
                }
            )
            save_file(tensors, output, meta, overwrite=overwrite)
            report["tuned_sha256"] = hashers[0].digest if hashers else ""
            report["base_sha256"] = hashers[1].digest if hashers else ""
        report["profile"] = profile.as_dict()["stages"]
        report["seconds"] = round(time.perf_counter() - t0, 2)
        report["peak_rss_mb"] = peak_rss_mb()
        say(total, total, "done")
        return report
    finally:
        for h in hashers:
            h.stop.set()
            h.join(timeout=30)
        t.close()
        b.close()


def summary(report: dict) -> str:
    """A few lines for the terminal."""
    lay = report["layers"].values()
    kept = [v["kept"] for v in lay]
    lines = [
        f"extracted {report['modules']} modules ({report['arch']}, rank {report['rank']}"
        + (f", conv rank {report['conv_rank']}" if report["conv_rank"] else "")
        + (f", {report['dynamic']}" if report["dynamic"] else "")
        + f") in {report['seconds']} s"
        + (f" -> {report['output']}" if report.get("output") else " (dry run)")
    ]
    if kept:
        lines.append(f"energy kept per layer: min {min(kept):.1%}, mean {sum(kept) / len(kept):.1%}")
    if report["skipped"]:
        lines.append(
            f"skipped {len(report['skipped'])} unchanged layers: "
            + ", ".join(s["module"] for s in report["skipped"][:8])
            + (" …" if len(report["skipped"]) > 8 else "")
        )
    return "\n".join(lines)
