"""The bake's report (a JSON-serialisable dict), its one-screen summary and the output's recipe metadata."""

from __future__ import annotations

import json
import math
import os

from .. import __version__
from ..blocks import format_weights
from ..formats.arch import Arch
from ..formats.dtypes import DROP_METADATA, HASH_PLACEHOLDER
from ..streaming import peak_rss_mb
from .plan import Plan


def bake_metadata(plan: Plan, save_dtype: str, base_sha: str) -> dict[str, str]:
    meta = {k: v for k, v in plan.base.metadata.items() if k not in DROP_METADATA}
    recipe = {
        "operation": "bake",
        "base": {"file": os.path.basename(plan.base.path), "sha256": base_sha, "arch": plan.arch.id},
        "loras": [
            {
                "name": st.spec.label,
                "file": os.path.basename(st.spec.path),
                "sha256": st.sha256 or HASH_PLACEHOLDER,  # the check beside the stream patches it in
                "strength": st.spec.strength,
                "te_strength": st.spec.te_strength if st.spec.te_strength is not None else st.spec.strength,
                "blocks": format_weights(st.weights, plan.arch.id) if st.spec.blocks else None,
            }
            for st in plan.loras
        ],
        "save_dtype": save_dtype,
    }
    meta["lorakit.version"] = __version__
    meta["lorakit.recipe"] = json.dumps(recipe, separators=(",", ":"))
    return meta


def bake_report(
    plan: Plan, stats, output: str | None, save_dtype: str, base_sha: str, dry_run: bool, wall: float
) -> dict:
    arch = plan.arch
    loras = []
    for st in plan.loras:
        total = len(st.parsed.modules) + len(st.parsed.unknown)
        loras.append(
            {
                "name": st.spec.label,
                "path": st.spec.path,
                "sha256": st.sha256,
                "sha256_source": st.sha256_source,
                "strength": st.spec.strength,
                "te_strength": st.spec.te_strength if st.spec.te_strength is not None else st.spec.strength,
                "blocks": format_weights(st.weights, arch.id) if st.spec.blocks else None,
                "family": st.family.as_dict(),
                "algorithms": dict(st.algorithms),
                "layers": total,
                "matched": {c: st.matched.get(c, 0) for c in ("unet", "te1", "te2") if c in arch.prefixes},
                "unmatched": [{"layer": m, "reason": r} for m, r in st.unmatched],
                "embeddings_not_baked": sorted(st.parsed.embeddings),
                "rank": {"min": min(st.ranks), "max": max(st.ranks)} if st.ranks else None,
                "scale": st.scales.report() if st.scales is not None else None,
                "naming_normalised": dict(st.naming),
                "max_rel_change_by_block": {
                    b: _r(v) for b, v in sorted(st.block_change.items(), key=_block_sort(arch))
                },
            }
        )
    return {
        "lorakit_version": __version__,
        "operation": "bake",
        "dry_run": dry_run,
        "base": {"path": plan.base.path, "sha256": base_sha or None, "family": plan.family.as_dict()},
        "output": None if dry_run else {"path": os.path.abspath(output), "save_dtype": save_dtype},
        "loras": loras,
        "tensors": {
            "modified": stats.modified,
            "converted": stats.converted,
            "copied": stats.copied,
            "planned": len(plan.weights) + len(plan.biases),
        },
        "rounding": {
            "save_dtype": save_dtype,
            "max_abs_rounding_loss": stats.max_round[0],
            "key": stats.max_round[1] or None,
            "max_abs_weight": stats.max_abs[0],
        },
        "warnings": plan.warnings,
        "wall_s": round(wall, 3),
        "peak_rss_mb": None if (rss := peak_rss_mb()) is None else round(rss, 1),
    }


def _r(v: float) -> float:
    return float(f"{v:.6g}") if math.isfinite(v) else v


def _block_sort(arch: Arch):
    order = {b: i for i, b in enumerate(arch.blocks)}
    return lambda kv: (order.get(kv[0], len(order)), kv[0])


def scale_lines(scale: dict | None, naming: dict | None, indent: str = "  ") -> list[str]:
    """Report lines on where the scales came from and which non-standard names were normalised."""
    out = []
    if scale:
        src = "; ".join(f"{k} ({v} module{'s' if v != 1 else ''})" for k, v in scale["sources"].items())
        if src:
            out.append(f"{indent}scale from: {src}")
        if scale.get("runtime_differs"):
            out.append(f"{indent}note: {scale['runtime_differs']}")
        out.extend(f"{indent}note: {n}" for n in scale.get("notes", []))
    for note, n in (naming or {}).items():
        out.append(f"{indent}naming normalised: {note} ({n} module{'s' if n != 1 else ''})")
    return out


def summary(report: dict) -> str:
    """A short human-readable account of a bake report."""
    lines = []
    fam = report["base"]["family"]
    head = "Dry run (nothing written)" if report["dry_run"] else f"Baked {report['output']['path']}"
    lines.append(
        f"{head} — base {os.path.basename(report['base']['path'])} ({fam['arch_label']}"
        + (", v-pred" if fam.get("vpred") else "")
        + ")"
    )
    for lo in report["loras"]:
        m = lo["matched"]
        algos = ", ".join(f"{k} {v}" for k, v in sorted(lo["algorithms"].items()))
        te = f" te {lo['te_strength']:g}" if lo["te_strength"] != lo["strength"] else ""
        lines.append(
            f"  {lo['name']} @ {lo['strength']:g}{te}: "
            + ", ".join(f"{c} {n}" for c, n in m.items())
            + f" of {lo['layers']} layers matched ({algos})"
            + (f"; {len(lo['unmatched'])} UNMATCHED" if lo["unmatched"] else "")
        )
        lines.extend(scale_lines(lo.get("scale"), lo.get("naming_normalised"), indent="    "))
    t = report["tensors"]
    if report["dry_run"]:  # nothing is computed: say what the bake would change, not "0 changed"
        lines.append(
            f"  tensors: {t.get('planned', '?')} would change (a dry run plans only; the changes are "
            "measured when baking)"
        )
        return _summary_tail(report, lines)
    lines.append(f"  tensors: {t['modified']} changed, {t['converted']} converted, {t['copied']} copied as is")
    lines.append("  largest relative change |strength·dW|/|W| by block:")
    for lo in report["loras"]:
        top = sorted(lo["max_rel_change_by_block"].items(), key=lambda kv: -kv[1])[:4]
        lines.append(f"    {lo['name']}: " + (", ".join(f"{b} {v:.3g}" for b, v in top) or "no change"))
    r = report["rounding"]
    lines.append(
        f"  saved as {r['save_dtype']}: max rounding loss {r['max_abs_rounding_loss']:.3g}, "
        f"max |w| {r['max_abs_weight']:.4g}"
    )
    return _summary_tail(report, lines)


def _summary_tail(report: dict, lines: list[str]) -> str:
    for w in report["warnings"]:
        lines.append(f"  warning: {w}")
    mem = f", peak memory {report['peak_rss_mb']:.0f} MB" if report.get("peak_rss_mb") else ""
    lines.append(f"  {report['wall_s']:.2f} s{mem}")
    return "\n".join(lines)
