"""Quantized model directories in compressed-tensors' ``pack-quantized`` format, the format vLLM's
compressed-tensors loader and llm-compressor use for weight-only int8 / int4 Mixtral checkpoints.

An HF Mixtral directory whose config.json carries a ``quantization_config`` ({"quant_method":
"compressed-tensors", "format": "pack-quantized", ...}); each quantized linear ``X.weight`` is
stored as three tensors beside the full-precision ones (router, norms, embedding):

    X.weight_packed  int32 (O, ceil(I * bits / 32)), values + 2^(bits-1) packed from the low bits up
    X.weight_scale   (O, G) in the model's dtype: G = 1 per channel, I / group_size per group
    X.weight_shape   int64 [O, I]

Each expert keeps its own tensors under its own name (``...experts.{e}.w1.weight_packed``). Read as
bytes on a little-endian machine, the packed words are moegpt's packed layout (quant/scheme.py), so
loading is a view. Loading checks every quantized tensor against the config before any is used: a
missing, mis-shaped or unexpected tensor (a scale shared by all experts, a missing expert) fails
naming it.

moegpt writes the tensors and the config itself; tests check them against the compressed-tensors
library (its config model parses ours, its decompressor gives our weights back).

Legend: E experts, O out features, I in features, G groups per row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from moegpt.checkpoint.hf import EXPERT_NAMES, NAME_MAP
from moegpt.config import ModelConfig
from moegpt.model import MoEGPT
from moegpt.quant.fp8 import E4M3
from moegpt.quant.model import EMBEDDING, attach, is_quantized, model_scheme, row_packed, stored, targets
from moegpt.quant.scheme import QuantScheme

FORMAT = "pack-quantized"
FLOAT_FORMAT = "float-quantized"  # fp8 weights stored as e4m3 X.weight beside X.weight_scale
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")
# the router is never quantized, whichever name a writer gives it (transformers 5 calls it mlp.gate)
ROUTER_IGNORE = ("re:.*block_sparse_moe\\.gate$", "re:.*mlp\\.gate$")
_LAYER = re.compile(r"^layers\.(\d+)\.")
_EXPERT = re.compile(r"experts\.\d+\.")


def quantization_config(scheme: QuantScheme, head_quantized: bool, embedding_quantized: bool = False) -> dict:
    """config.json's quantization_config for ``scheme``; a quantized embedding table is targeted by its
    class name, ``Embedding`` (as llm-compressor's embedding recipe writes it)."""
    weights = {"num_bits": scheme.bits, "type": "float" if scheme.float8 else "int", "symmetric": True,
               "strategy": "channel" if scheme.group_size is None else "group", "group_size": scheme.group_size,
               "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}
    # fp8: activations quantized per token at run time (vLLM's "FP8 dynamic")
    activations = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True,
                   "group_size": None, "observer": None} if scheme.float8 else None
    fmt = FLOAT_FORMAT if scheme.float8 else FORMAT
    return {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"] + (["Embedding"] if embedding_quantized else []),
                                      "weights": weights, "input_activations": activations,
                                      "output_activations": None, "format": fmt}},
        "ignore": list(ROUTER_IGNORE) + ([] if head_quantized else ["lm_head"]),
        "kv_cache_scheme": None, "sparsity_config": {},
    }


def scheme_from_config(qc: object, where: str) -> QuantScheme:
    """The one weight scheme a quantization_config describes; one-line errors naming the field."""
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config is not a JSON object")
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{where}: quantization_config.quant_method={qc.get('quant_method')!r} is not supported "
                         "('compressed-tensors')")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError(f"{where}: quantization_config.config_groups must hold one group, got "
                         f"{len(groups) if isinstance(groups, dict) else groups!r}")
    (name, group), = groups.items()
    fmt = group.get("format") or qc.get("format")
    if fmt not in (FORMAT, FLOAT_FORMAT):
        raise ValueError(f"{where}: quantization format {fmt!r} is not supported ({FORMAT!r}, {FLOAT_FORMAT!r})")
    w = group.get("weights") or {}
    field = f"{where}: config_groups.{name}.weights"
    if fmt == FLOAT_FORMAT:
        a = group.get("input_activations") or {}
        if (w.get("type"), w.get("num_bits"), w.get("strategy")) != ("float", 8, "channel") or \
                (a.get("type"), a.get("num_bits"), a.get("strategy"), a.get("dynamic")) != ("float", 8, "token", True):
            raise ValueError(f"{where}: config_groups.{name}: {FLOAT_FORMAT!r} is supported as fp8 weights per channel "
                             "with fp8 activations per token, quantized at run time")
        return QuantScheme(bits=8, float8=True)
    if group.get("input_activations") or group.get("output_activations"):
        raise ValueError(f"{where}: config_groups.{name}: activation quantization is not supported (weight-only)")
    if w.get("type") != "int" or not w.get("symmetric", False) or w.get("dynamic", False):
        raise ValueError(f"{field}: type={w.get('type')!r} symmetric={w.get('symmetric')!r} is not supported "
                         "(symmetric int)")
    strategy = w.get("strategy")
    if strategy not in ("channel", "group"):
        raise ValueError(f"{field}.strategy={strategy!r} is not supported ('channel', 'group')")
    if strategy == "group" and w.get("group_size") is None:
        raise ValueError(f"{field}: strategy 'group' without a group_size")
    try:
        return QuantScheme(bits=w.get("num_bits"), group_size=w.get("group_size") if strategy == "group" else None)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None


@dataclass(frozen=True)
class Stored:
    """One HF linear's quantized tensors, in moegpt's layout."""

    packed: torch.Tensor  # (O, P) uint8, a view of weight_packed; fp8: (O, I) e4m3
    scale: torch.Tensor  # (O, G) fp32


def hf_bases(name: str, n_experts: int) -> list[str]:
    """Our weight name -> the HF linear name(s) it is stored under (one per expert for a stack),
    without the ``.weight`` suffix."""
    m = _LAYER.match(name)
    template = _LAYER.sub("layers.{i}.", name)
    i = m.group(1) if m else None
    if template in NAME_MAP:
        return [NAME_MAP[template].format(i=i).removesuffix(".weight")]
    if template in EXPERT_NAMES:
        return [EXPERT_NAMES[template].format(i=i, e=e).removesuffix(".weight") for e in range(n_experts)]
    raise KeyError(f"no HF name for weight {name!r}")


def hf_quantized_tensors(model: MoEGPT) -> dict[str, torch.Tensor]:
    """The quantized weights of ``model`` as compressed-tensors' HF tensors (experts unstacked)."""
    out: dict[str, torch.Tensor] = {}
    for t in targets(model):
        if not is_quantized(t.module, t.attr):
            continue
        dq = stored(t.module, t.attr)[1]
        packed, scale = row_packed(t.module, t.attr)
        if dq.scheme.float8:  # float-quantized: the e4m3 values as the weight itself
            packed, scale = packed.reshape(-1, *packed.shape[-2:]).cpu(), scale.reshape(-1, *scale.shape[-2:]).cpu()
            for e, base in enumerate(hf_bases(t.name, model.cfg.n_experts)):
                out[f"{base}.weight"] = packed[e].contiguous()
                out[f"{base}.weight_scale"] = scale[e].to(dq.dtype).contiguous()
            continue
        I = packed.shape[-1] * 8 // dq.scheme.bits
        words = -(-I * dq.scheme.bits // 32)
        packed = packed.reshape(-1, *packed.shape[-2:]).cpu()
        scale = scale.reshape(-1, *scale.shape[-2:]).cpu()
        for e, base in enumerate(hf_bases(t.name, model.cfg.n_experts)):
            p = torch.nn.functional.pad(packed[e], (0, words * 4 - packed.shape[-1]))  # whole int32 words
            out[f"{base}.weight_packed"] = p.contiguous().view(torch.int32)
            out[f"{base}.weight_scale"] = scale[e].to(dq.dtype).contiguous()
            out[f"{base}.weight_shape"] = torch.tensor([packed.shape[-2], I], dtype=torch.int64)
    return out


def split_quantized(tensors: dict[str, torch.Tensor], cfg: ModelConfig, scheme: QuantScheme, where: str,
                    embedding: bool = False) -> dict[str, Stored]:
    """Take every ``X.weight_*`` trio out of ``tensors`` (checked against ``cfg`` and ``scheme``) and put
    a meta ``X.weight`` of its shape in its place, so the name mapping runs as for a full-precision
    directory; returns {X: Stored}. ``embedding``: whether the config quantizes the embedding table
    (its tensors must then be there, and must not be otherwise)."""
    with torch.device("meta"):
        expected = {}
        for name, p in MoEGPT(cfg).state_dict().items():
            for e, base in enumerate(hf_bases(name, cfg.n_experts)):
                expected[base] = tuple(p.shape[1:] if p.dim() == 3 else p.shape)
    table = hf_bases(EMBEDDING, cfg.n_experts)[0]
    if scheme.float8:
        found = _split_float8(tensors, expected, where)
        check_table(table in found, embedding, scheme, cfg, where)
        return found
    bases = sorted({k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] in SUFFIXES})
    found: dict[str, Stored] = {}
    for base in bases:
        for suffix in SUFFIXES:
            if f"{base}.{suffix}" not in tensors:
                raise ValueError(f"{where}: quantized weight {base} has no tensor {base}.{suffix}")
        packed, scale, shape = (tensors.pop(f"{base}.{s}") for s in SUFFIXES)
        if base not in expected:
            raise ValueError(f"{where}: unexpected quantized tensor {base}.weight_packed")
        O, I = expected[base]
        if shape.tolist() != [O, I]:
            raise ValueError(f"{where}: {base}.weight_shape is {shape.tolist()}, the config implies {[O, I]}")
        words = -(-I * scheme.bits // 32)
        if packed.dtype != torch.int32 or tuple(packed.shape) != (O, words):
            raise ValueError(f"{where}: {base}.weight_packed is {packed.dtype} {tuple(packed.shape)}, "
                             f"{scheme.name} of {[O, I]} is torch.int32 {(O, words)}")
        G = scheme.groups(I)
        if not scale.is_floating_point() or tuple(scale.shape) != (O, G):
            raise ValueError(f"{where}: {base}.weight_scale is {scale.dtype} {tuple(scale.shape)}, {scheme.name} of "
                             f"{[O, I]} has a floating scale of shape {(O, G)}")
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError(f"{where}: {base}.weight_scale has a scale that is not finite and positive")
        found[base] = Stored(packed=packed.view(torch.uint8)[:, :I * scheme.bits // 8], scale=scale.float())
        tensors[f"{base}.weight"] = torch.empty(O, I, device="meta")
    _check_whole_stacks(found, expected, "weight_packed", where)
    check_table(table in found, embedding, scheme, cfg, where)
    return found


def check_table(stored: bool, targeted: bool, scheme: QuantScheme, cfg: ModelConfig, where: str) -> None:
    """A quantized embedding table (``stored``) must be what the config's targets say (``targeted``),
    int8 or int4, and in an untied model; one-line errors naming the tensor."""
    table = hf_bases(EMBEDDING, cfg.n_experts)[0]
    suffix = "weight" if scheme.float8 else "weight_packed"
    if scheme.float8 and (targeted or stored):
        raise ValueError(f"{where}: an fp8 embedding table ({table}) is not supported (fp8 is for matmuls; int8 "
                         "or int4 tables are)")
    if targeted and not stored:
        raise ValueError(f"{where}: the quantization_config targets Embedding but {table}.{suffix} is missing")
    if stored and not targeted:
        raise ValueError(f"{where}: unexpected quantized tensor {table}.{suffix} (the quantization_config's "
                         "targets do not name Embedding)")
    if stored and cfg.tie_embeddings:
        raise ValueError(f"{where}: {table} is quantized but the model ties its LM head to it; a quantized table "
                         "is for untied models")


def _check_whole_stacks(found: dict[str, Stored], expected: dict, suffix: str, where: str) -> None:
    """An expert stack is quantized whole or not at all."""
    stacks = {_EXPERT.sub("experts.*.", b) for b in found}
    for base in expected:
        if _EXPERT.sub("experts.*.", base) in stacks and base not in found:
            raise ValueError(f"{where}: experts are quantized but {base}.{suffix} is missing")


def _split_float8(tensors: dict[str, torch.Tensor], expected: dict, where: str) -> dict[str, Stored]:
    """float-quantized: every e4m3 ``X.weight`` and its ``X.weight_scale`` (O, 1), checked; the weight
    replaced by a meta tensor of its shape."""
    found: dict[str, Stored] = {}
    for key in sorted(k for k in tensors if k.endswith(".weight_scale")):
        base = key.removesuffix(".weight_scale")
        if base not in expected:
            raise ValueError(f"{where}: unexpected quantized tensor {key}")
        O, I = expected[base]
        weight, scale = tensors.get(f"{base}.weight"), tensors.pop(key)
        if weight is None or weight.dtype != E4M3 or tuple(weight.shape) != (O, I):
            got = "missing" if weight is None else f"{weight.dtype} {tuple(weight.shape)}"
            raise ValueError(f"{where}: {base}.weight is {got}, fp8 of {[O, I]} is torch.float8_e4m3fn {(O, I)}")
        if not scale.is_floating_point() or tuple(scale.shape) != (O, 1):
            raise ValueError(f"{where}: {key} is {scale.dtype} {tuple(scale.shape)}, fp8 of {[O, I]} has a floating "
                             f"scale of shape {(O, 1)}")
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError(f"{where}: {key} has a scale that is not finite and positive")
        found[base] = Stored(packed=weight, scale=scale.float())
        tensors[f"{base}.weight"] = torch.empty(O, I, device="meta")
    stray = sorted(k for k, t in tensors.items() if t.dtype == E4M3)
    if stray:
        raise ValueError(f"{where}: fp8 tensor {stray[0]} has no weight_scale")
    _check_whole_stacks(found, expected, "weight_scale", where)
    return found


def attach_quantized(model: MoEGPT, found: dict[str, Stored], scheme: QuantScheme, dtype: torch.dtype) -> None:
    """Give each target weight stored quantized in ``found`` its packed bytes and scales (experts
    stacked); a stack must be quantized for every expert or none."""
    for t in targets(model, embedding=True):
        bases = hf_bases(t.name, model.cfg.n_experts)
        have = [b for b in bases if b in found]
        if not have:
            continue
        if len(have) != len(bases):
            missing = next(b for b in bases if b not in found)
            raise ValueError(f"{t.name}: experts are quantized but {missing}.weight_packed is missing")
        packed = torch.stack([found[b].packed for b in bases]) if len(bases) > 1 else found[bases[0]].packed
        scale = torch.stack([found[b].scale for b in bases]) if len(bases) > 1 else found[bases[0]].scale
        attach(t.module, t.attr, packed, scale, scheme, dtype)


def quantized_config(model: MoEGPT) -> dict | None:
    """The quantization_config a directory of ``model`` carries (None: full precision)."""
    scheme = model_scheme(model)
    if scheme is None:
        return None
    head = getattr(model, "lm_head", None)
    return quantization_config(scheme, head is not None and is_quantized(head, "weight"),
                               is_quantized(model.embed, "weight"))


def quantizes_embedding(qc: dict) -> bool:
    """Whether a (parsed: ``scheme_from_config`` accepted it) quantization_config's group targets the
    embedding table, by class name or by a regex naming embed_tokens."""
    (group,) = qc["config_groups"].values()
    targets = group.get("targets") or []
    if isinstance(targets, str):
        targets = [targets]
    return any(isinstance(t, str) and (t == "Embedding" or (t.startswith("re:") and "embed_tokens" in t))
               for t in targets)
