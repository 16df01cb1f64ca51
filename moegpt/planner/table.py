"""Text rendering of a plan: one readable table, section by section, units chosen from field names.

The table is drawn from ``Plan.to_dict()``, so it always shows the same fields as ``--json``; only
the formatting (SI prefixes, percentages, durations) is added here, and, under decode, the bytes one
GPU reads per stage step (the numerator of t_mem), so a prediction can be checked by hand.
"""

from __future__ import annotations

from moegpt.planner.plan import Plan

SECTIONS = ("model", "params", "flops", "parallelism", "memory", "moe", "roofline", "decode", "training",
            "inference_cost", "derived", "vision")


def si(x: float, unit: str = "", digits: int = 3) -> str:
    """1.83e12 -> '1.83 TFLOP' with a unit; a bare count reads as the article writes it: '1.83T', '282B'."""
    if abs(x) >= 1e18:
        return f"{x:.3g} {unit}".rstrip()
    prefixes = (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))
    if not unit:
        prefixes = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3))
    for prefix, scale in prefixes:
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g} {prefix}{unit}" if unit else f"{x / scale:.{digits}g}{prefix}"
    return f"{x:.3g} {unit}".rstrip()


def duration(s: float) -> str:
    if s >= 86_400:
        return f"{s / 86_400:.3g} days"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt(name: str, value, section: str = "") -> str:
    """Format one field by its name (and section): USD, fractions, bytes, tokens/s, seconds, FLOPs, counts."""
    if section == "flops" and isinstance(value, (int, float)):
        return si(value, "FLOP")
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value
    if name.endswith("_usd") or name.startswith("usd_"):
        return "$" + si(value) if value >= 1e6 else f"${value:,.2f}" if value >= 100 else f"${value:.4g}"
    if "mfu" in name or "fraction" in name:
        return f"{value:.2%}"
    if name.endswith("bytes_per_s"):
        return si(value, "B/s")
    if "bytes" in name and "per_byte" not in name:
        return si(value, "B")
    if name.startswith("max_params"):
        return si(value)
    if "tokens_per_s" in name or name.endswith("tok_s"):
        return f"{value:,.0f} tok/s" if value >= 1000 else f"{value:.4g} tok/s"
    if name.endswith("_s"):
        return duration(value)
    if "flops" in name:
        return si(value, "FLOP")
    if isinstance(value, int) and abs(value) < 10_000_000:
        return f"{value:,}"
    if isinstance(value, float) and abs(value) < 1000:
        return f"{value:.4g}"
    return si(value)


def hardware_line(d: dict, measured_on: str | None, fp32: float | None) -> str:
    peaks = ", ".join(f"{k} {si(v, 'FLOP/s')}" for k, v in d["peak_flops"].items() if v is not None)
    nvlink = "-" if d["nvlink_bytes_per_s"] is None else si(d["nvlink_bytes_per_s"], "B/s")
    memory = "HBM" if measured_on is None else "read (1 GiB sum)"
    line = (f"{d['name']}: {si(d['mem_bytes'], 'B')}, {memory} {si(d['hbm_bytes_per_s'], 'B/s')}, {peaks}, "
            f"NVLink {nvlink}, bf16 ridge {d['ridge_flop_per_byte']:.3g} FLOP/B")
    if measured_on is not None:
        line += f"; measured {measured_on}" + ("" if fp32 is None else f", fp32 {si(fp32, 'FLOP/s')}")
    return line


def label(name: str) -> str:
    """'t_mem_s' -> 't mem': the value carries the unit, so a trailing '_s' (seconds) is dropped."""
    name = name.removesuffix("_s") if not name.endswith("per_s") else name
    return name.replace("_", " ")


def render(p: Plan) -> str:
    d = p.to_dict()
    inp = d["inputs"]
    lay = inp["parallelism"]
    hw = p.inputs.hardware
    lines = [
        f"moegpt plan: {inp['preset']} ({inp['mode']}) on {si(float(inp['gpus']))} x {inp['hardware']}, "
        f"tp {lay['tp']} x pp {lay['pp']} x dp {lay['dp']:g} (ep {lay['ep']}), "
        f"weights {inp['precision']['weight_bytes']} B, KV {inp['precision']['kv_bytes']} B"
        + (", input embedding read by row (lookup)" if p.inputs.options.embedding_lookup else ""),
        "hardware  " + hardware_line(d["hardware"], hw.measured_on, hw.peak_flops_fp32),
    ]
    for section in SECTIONS:
        values = d[section]
        if all(v is None for v in values.values()):
            continue  # a section of the other mode
        lines.append(f"{section}")
        for name, value in values.items():
            if value is not None:
                lines.append(f"  {label(name):<46} {fmt(name, value, section):>16}")
        if section == "decode" and p.reads is not None:  # the t_mem numerator, to check a prediction by
            r = p.reads
            lines.append(f"  {'bytes read per GPU per stage step':<46} {si(r.weight_bytes + r.kv_bytes, 'B'):>16}")
            lines.append(f"  {'  of which weights / KV cache':<46} "
                         f"{si(r.weight_bytes, 'B') + ' / ' + si(r.kv_bytes, 'B'):>16}")
    if d["warnings"]:
        lines.append("warnings")
        lines.extend(f"  {w['code']}: {w['message']}" for w in d["warnings"])
    return "\n".join(lines)
