"""checkpoint/partial.py reads exactly the asked-for slices of a directory's tensors, from Mixtral's
per-expert tensors or transformers' fused experts, or a quantized directory's packed weights and
scales, and names what is missing or misshapen."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from moegpt.checkpoint.model_dir import load, save
from moegpt.checkpoint.partial import load_part
from moegpt.config import ModelConfig
from moegpt.model import build_model
from moegpt.quant.model import is_quantized, quantize_model
from moegpt.quant.scheme import parse_scheme

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, n_experts=4, top_k=2,
                  max_seq_len=32)
PARTS = {
    "layers.1.attn.wq.weight": (slice(8, 24),),
    "layers.1.attn.wo.weight": (slice(None), slice(0, 16)),
    "layers.1.ffn.experts.w_gate": (slice(2, 4), slice(24, 48)),
    "layers.1.ffn.experts.w_up": (slice(0, 2), slice(0, 24), slice(None)),
    "layers.1.ffn.experts.w_down": (slice(2, 4), slice(None), slice(24, 48)),
    "layers.1.ffn.router.weight": (slice(None),),
    "norm.weight": (slice(None),),
}


def fuse_experts(directory) -> None:
    """Rewrite a directory's experts as transformers 5 saves them: gate_up_proj / down_proj, mlp.gate."""
    t = load_file(directory / "model.safetensors")
    for i in range(CFG.n_layers):
        p = f"model.layers.{i}.block_sparse_moe."
        gate = torch.stack([t.pop(f"{p}experts.{e}.w1.weight") for e in range(CFG.n_experts)])
        down = torch.stack([t.pop(f"{p}experts.{e}.w2.weight") for e in range(CFG.n_experts)])
        up = torch.stack([t.pop(f"{p}experts.{e}.w3.weight") for e in range(CFG.n_experts)])
        t[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        t[f"model.layers.{i}.mlp.experts.down_proj"] = down
        t[f"model.layers.{i}.mlp.gate.weight"] = t.pop(f"{p}gate.weight")
    save_file(t, directory / "model.safetensors")


@pytest.mark.parametrize("fused", [False, True])
def test_the_parts_read_are_the_full_tensors_slices(tmp_path, fused):
    save(build_model(CFG, seed=3), None, tmp_path)
    full = dict(load(tmp_path).model.named_parameters())
    if fused:
        fuse_experts(tmp_path)
    part = dict(load_part(tmp_path, PARTS.get).model.named_parameters())
    for name, p in part.items():
        if name in PARTS:
            assert torch.equal(p, full[name][PARTS[name]]), name
        else:
            assert p.is_meta, name  # not asked for: never read


def test_a_missing_or_misshapen_tensor_is_named(tmp_path):
    save(build_model(CFG, seed=3), None, tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    t.pop("model.layers.1.self_attn.q_proj.weight")
    t["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(32, 8)
    save_file(t, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.self_attn.q_proj.weight'"):
        load_part(tmp_path, PARTS.get)
    with pytest.raises(ValueError, match=r"o_proj.weight has shape \(32, 8\), config implies \(32, 32\)"):
        load_part(tmp_path, {"layers.1.attn.wo.weight": (slice(None),)}.get)


QCFG = CFG.replace(d_model=64, n_heads=4, head_dim=16, d_ff=64)  # whole int4 groups of 32 in every split below
QPARTS = {
    "layers.1.attn.wq.weight": (slice(16, 48),),
    "layers.1.attn.wo.weight": (slice(None), slice(0, 32)),
    "layers.1.ffn.experts.w_gate": (slice(2, 4), slice(32, 64)),
    "layers.1.ffn.experts.w_down": (slice(0, 2), slice(None), slice(32, 64)),
    "lm_head.weight": (slice(None),),
    "norm.weight": (slice(None),),
}


def _owner(model, name):
    """(module, attribute) of a weight's name."""
    module, _, attr = name.rpartition(".")
    return model.get_submodule(module), attr


def _weight(model, name):
    return getattr(*_owner(model, name))


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_a_quantized_directory_gives_each_part_its_packed_bytes_and_scales(tmp_path, scheme):
    """A rank reads its rows and columns of the packed weights and their scales: dequantized, its part
    is exactly the slice of the whole model's dequantized weight."""
    model = quantize_model(build_model(QCFG, seed=3), parse_scheme(scheme, 32 if scheme == "int4" else None))
    save(model, None, tmp_path)
    full, part = load(tmp_path).model, load_part(tmp_path, QPARTS.get).model
    for name, sl in QPARTS.items():
        assert torch.equal(_weight(part, name), _weight(full, name)[sl]), name
        if name != "norm.weight":
            assert is_quantized(*_owner(part, name)), name  # held packed, not dequantized at load
    assert part.layers[0].attn.wq.weight.is_meta  # not asked for: never read


def test_a_quantized_embedding_table_is_read_packed_by_the_rank_that_holds_it(tmp_path):
    save(quantize_model(build_model(QCFG, seed=3), parse_scheme("int4", 32), embedding=True), None, tmp_path)
    full = load(tmp_path).model
    part = load_part(tmp_path, lambda name: () if name == "embed.weight" else None).model
    assert is_quantized(part.embed, "weight") and torch.equal(part.embed.weight, full.embed.weight)
    ids = torch.tensor([0, 5, 5, 63])
    assert torch.equal(part.embed(ids), full.embed(ids))


def test_a_quantized_part_off_its_groups_or_missing_its_scale_is_named(tmp_path):
    save(quantize_model(build_model(QCFG, seed=3), parse_scheme("int4", 32)), None, tmp_path)
    with pytest.raises(ValueError, match="o_proj: columns 16:48 of 64 do not fall on whole int4-g32 words and groups"):
        load_part(tmp_path, {"layers.1.attn.wo.weight": (slice(None), slice(16, 48))}.get)
    t = load_file(tmp_path / "model.safetensors")
    t.pop("model.layers.1.self_attn.q_proj.weight_shape")
    save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.self_attn.q_proj.weight_shape'"):
        load_part(tmp_path, QPARTS.get)
