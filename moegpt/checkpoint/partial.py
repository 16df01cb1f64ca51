"""Reading part of a model directory: each tensor only in the slices the caller keeps, straight from
the safetensors files, never the whole tensor. A rank of a sharded
model reads its shard this way, so its peak memory is its share of the weights.

    loaded = load_part(directory, keep)   # keep(name) -> a slice per dim, or None: not held

The model is built on the meta device with the whole model's config; every parameter ``keep``
takes is materialised at its slice's shape (in the stored dtype); the ones it does not take stay on
meta for the caller to drop. Names are the model's (``layers.3.ffn.experts.w_up``); the files may
hold Mixtral's per-expert tensors or transformers' fused ``experts.gate_up_proj`` / ``down_proj``.

A quantized directory (checkpoint/quantized.py: compressed-tensors) gives each quantized weight's
part as its packed bytes and scales, read the same way: rows of the packed words and scales, and
columns on whole words (and, for int4, whole groups), so a rank holds its share of the packed
weight, dequantized as one process would.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from moegpt.checkpoint.hf import EXPERT_NAMES, NAME_MAP
from moegpt.checkpoint.model_dir import LoadedModel, read_directory, read_hf_config
from moegpt.checkpoint.quantized import check_table, hf_bases, quantizes_embedding
from moegpt.model import MoEGPT
from moegpt.quant.fp8 import E4M3
from moegpt.quant.model import EMBEDDING, attach, targets
from moegpt.quant.scheme import QuantScheme

Keep = Callable[[str], tuple[slice, ...] | None]


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class _Files:
    """The directory's safetensors files: each tensor's file, dtype, shape and byte offset, from the
    files' headers. A part is read with plain reads into its own tensor (no memory map, so the
    process never holds pages of the parts it does not keep)."""

    def __init__(self, directory: Path):
        single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
        if single.exists():
            files = [single]
        elif index.exists():
            files = [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        else:
            raise ValueError(f"{directory}: no model.safetensors or model.safetensors.index.json")
        self.where: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}
        for f in files:
            try:
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(n))
                for name, entry in header.items():
                    if name != "__metadata__":
                        self.where[name] = (f, _DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                            8 + n + entry["data_offsets"][0])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{f}: cannot read the safetensors header ({type(e).__name__}: {e})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def dtype(self, name: str) -> torch.dtype:
        if name not in self.where:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        return self.where[name][1]

    def read(self, name: str, shape: tuple[int, ...], part: tuple[slice, ...]) -> torch.Tensor:
        """``part`` of tensor ``name`` (unit-step slices), whose whole shape must be ``shape``."""
        if name not in self.where:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        path, dtype, stored, offset = self.where[name]
        if stored != shape:
            raise ValueError(f"tensor {name} has shape {stored}, config implies {shape}")
        if not shape or any(sl.step not in (None, 1) for sl in part):
            raise ValueError(f"tensor {name}: only unit-step slices of tensors with dims are read in parts")
        ranges = [sl.indices(n)[:2] for sl, n in zip(part, shape)]
        out = torch.empty([hi - lo for lo, hi in ranges], dtype=dtype)
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        item = dtype.itemsize
        strides = [item * math.prod(shape[d + 1:]) for d in range(len(shape))]
        # the trailing dims read whole are one contiguous run per index of the dims before them
        k = len(shape)
        while k > 0 and ranges[k - 1] == (0, shape[k - 1]):
            k -= 1
        k = max(k, 1)
        run = (ranges[k - 1][1] - ranges[k - 1][0]) * strides[k - 1]
        with open(path, "rb") as fh:
            pos = 0
            for index in itertools.product(*(range(lo, hi) for lo, hi in ranges[:k - 1])):
                start = offset + sum(i * st for i, st in zip(index, strides)) + ranges[k - 1][0] * strides[k - 1]
                fh.seek(start)
                if fh.readinto(buf[pos:pos + run]) != run:
                    raise ValueError(f"{path}: tensor {name} is truncated")
                pos += run
        return out


def _expert_part(files: _Files, ours: str, layer: int, shape: tuple[int, ...], part: tuple[slice, ...],
                 F: int) -> torch.Tensor:
    """Our stacked (E, out, in) expert tensor's ``part``, from per-expert or fused HF tensors."""
    E = shape[0]
    kind = ours.rsplit(".", 1)[1]  # w_gate | w_up | w_down
    fused = f"model.layers.{layer}.mlp.experts." + ("down_proj" if kind == "w_down" else "gate_up_proj")
    if fused in files:
        if kind == "w_down":
            return files.read(fused, shape, part)
        rows = part[1].indices(F)
        offset = F if kind == "w_up" else 0  # gate rows first, then up
        return files.read(fused, (E, 2 * F, shape[2]), (part[0], slice(rows[0] + offset, rows[1] + offset), part[2]))
    theirs = EXPERT_NAMES[f"layers.{{i}}.ffn.experts.{kind}"]
    return torch.stack([files.read(theirs.format(i=layer, e=e), shape[1:], part[1:])
                        for e in range(E)[part[0]]])


def _quantized_part(files: _Files, base: str, O: int, I: int, rows: slice, cols: slice, scheme: QuantScheme
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` x ``cols`` of the (O, I) HF linear ``base`` stored quantized -> (packed (o, c * bits / 8)
    uint8, or fp8 values (o, c), and scale (o, g) fp32), checked as a whole directory is loaded."""
    (r0, r1), (c0, c1) = rows.indices(O)[:2], cols.indices(I)[:2]
    if scheme.float8:
        if files.dtype(f"{base}.weight") != E4M3:
            raise ValueError(f"{base}.weight is {files.dtype(f'{base}.weight')}, fp8 weights are torch.float8_e4m3fn")
        packed = files.read(f"{base}.weight", (O, I), (rows, cols))
        scale = files.read(f"{base}.weight_scale", (O, 1), (rows, slice(None)))
    else:
        per_word, G = 32 // scheme.bits, scheme.groups(I)
        group = I // G  # inputs per scale (I: one per channel)
        if c0 % per_word or (c1 % per_word and c1 != I) or (G > 1 and (c0 % group or c1 % group)):
            raise ValueError(f"{base}: columns {c0}:{c1} of {I} do not fall on whole {scheme.name} words"
                             + (f" and groups of {group}" if G > 1 else ""))
        if files.dtype(f"{base}.weight_packed") != torch.int32:
            raise ValueError(f"{base}.weight_packed is {files.dtype(f'{base}.weight_packed')}, not torch.int32")
        shape = files.read(f"{base}.weight_shape", (2,), (slice(None),))
        if shape.tolist() != [O, I]:
            raise ValueError(f"{base}.weight_shape is {shape.tolist()}, the config implies {[O, I]}")
        words = files.read(f"{base}.weight_packed", (O, -(-I * scheme.bits // 32)),
                           (rows, slice(c0 // per_word, -(-c1 // per_word))))  # (o, w) int32
        packed = words.view(torch.uint8)[:, :(c1 - c0) * scheme.bits // 8].contiguous()
        groups = slice(c0 // group, c1 // group) if G > 1 else slice(None)
        scale = files.read(f"{base}.weight_scale", (O, G), (rows, groups))
    if not scale.is_floating_point() or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(f"{base}.weight_scale has a scale that is not finite and positive")
    return packed, scale.float()


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


@torch.no_grad()
def load_part(directory: str | Path, keep: Keep, device: str | torch.device = "cpu") -> LoadedModel:
    """The parts of ``directory``'s parameters that ``keep`` names (see the module docstring), from a
    text model directory in full precision or quantized."""
    directory = Path(directory)
    cfg, scheme, tokenizer = read_directory(directory)
    files = _Files(directory)
    with torch.device("meta"):
        model = MoEGPT(cfg)
    quantized = {t.name: t for t in targets(model, embedding=True)} if scheme is not None else {}
    if scheme is not None:  # the embedding table as the config says, whichever rank reads it
        table = hf_bases(EMBEDDING, cfg.n_experts)[0]
        check_table(f"{table}.weight_scale" in files, quantizes_embedding(read_hf_config(directory)["quantization_config"]),
                    scheme, cfg, str(directory))
    for name, p in list(model.named_parameters()):
        part = keep(name)
        if part is None:
            continue
        shape = tuple(p.shape)
        part = part + (slice(None),) * (len(shape) - len(part))
        bases = hf_bases(name, cfg.n_experts) if name in quantized else []
        if bases and f"{bases[0]}.weight_scale" in files:  # stored quantized
            if len(shape) == 3:  # an expert stack: the experts in part[0], each one's rows and columns
                bases, part = bases[part[0]], part[1:]
            values = [_quantized_part(files, b, *shape[-2:], *part, scheme) for b in bases]
            packed, scale = (torch.stack(v) if len(shape) == 3 else v[0] for v in zip(*values))
            t = quantized[name]
            attach(t.module, t.attr, packed.to(device), scale.to(device), scheme, files.dtype("model.norm.weight"))
            continue
        if ".ffn.experts." in name:
            value = _expert_part(files, name, int(name.split(".")[1]), shape, part, cfg.d_ff)
        else:
            key = name if not name.startswith("layers.") else "layers.{i}." + name.split(".", 2)[2]
            theirs = NAME_MAP[key].format(i=name.split(".")[1] if "{i}" in key else None)
            if key == "layers.{i}.ffn.router.weight" and theirs not in files:  # transformers' fused naming
                theirs = f"model.layers.{name.split('.')[1]}.mlp.gate.weight"
            value = files.read(theirs, shape, part)
        _set(model, name, value.to(device))
    return LoadedModel(model.eval(), tokenizer)
