"""moegpt export --gguf: the file the gguf package reads back, Q8_0 bytes identical to its quantizer,
and a forward pass computed from the file with llama.cpp's conventions (interleaved rope pairs,
its tensor layout) giving our model's logits."""

import math

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from moegpt.checkpoint.gguf import export_gguf, interleave_heads, q4_0, q8_0
from moegpt.checkpoint.model_dir import save
from moegpt.cli import main
from moegpt.config import ModelConfig, RopeScaling, RopeType
from moegpt.data.tokenizer import Tokenizer
from moegpt.model import build_model
from moegpt.quant.model import quantize_model
from moegpt.quant.scheme import parse_scheme

CFG = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=96, n_experts=4, top_k=2,
                  max_seq_len=64, rope_theta=5000.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tok = Tokenizer.train(["to be or not to be, that is the question\n" * 50], vocab_size=300)
    save(build_model(CFG, seed=0), tok, d)
    return d


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_blocks_are_byte_identical_to_the_gguf_packages_quantizer(kind):
    w = torch.randn(48, 256) * torch.logspace(-3, 1, 48)[:, None]
    w[5, 32:64] = 0  # an all-zero block: scale 0
    w[7, :32] = torch.arange(32) - 15.5  # values on .5 after scaling
    w[9, 64:96] = torch.tensor([1.0, -1.0] * 16)  # equal magnitudes of both signs: the first one sets Q4_0's scale
    halves = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -2.5] * 5 + [0.0])
    w[11, :32] = torch.cat([torch.tensor([127.0]), halves])  # Q8_0 scale 1: halves round away from zero
    w[13, :32] = torch.cat([torch.tensor([-8.0]), halves])  # Q4_0 scale 1: w + 8.5 lands on whole numbers
    qtype = GGMLQuantizationType.Q8_0 if kind == "q8_0" else GGMLQuantizationType.Q4_0
    assert (q8_0 if kind == "q8_0" else q4_0)(w) == quantize(w.numpy(), qtype).tobytes()


def _fields(reader) -> dict:
    return {name: f.contents() for name, f in reader.fields.items()}


def _weights(reader) -> dict[str, torch.Tensor]:
    """Every tensor of the file dequantized to fp32, in torch's order (outermost first)."""
    out = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        out[t.name] = torch.from_numpy(np.array(values, dtype=np.float32))
    return out


def ggml_forward(path, tokens: list[int]) -> torch.Tensor:
    """The file's model on ``tokens`` (T,) -> logits (T, V), as llama.cpp's llama architecture with
    experts computes it: rope on interleaved pairs, softmax routing over all experts, top-k renormalised."""
    reader = GGUFReader(path)
    meta, w = _fields(reader), _weights(reader)
    a = "llama."
    H, G, Dh = meta[a + "attention.head_count"], meta[a + "attention.head_count_kv"], meta[a + "rope.dimension_count"]
    E, K, eps = meta[a + "expert_count"], meta[a + "expert_used_count"], meta[a + "attention.layer_norm_rms_epsilon"]
    base = meta[a + "rope.freq_base"]
    T = len(tokens)
    pos = torch.arange(T, dtype=torch.float64)
    theta = pos[:, None] * base ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)  # (T, Dh/2)
    cos, sin = theta.cos().float(), theta.sin().float()

    def norm(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def rope(x):  # (T, n, Dh): pairs (2j, 2j + 1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        c, s = cos[:, None], sin[:, None]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)

    x = w["token_embd.weight"][tokens]  # (T, D)
    for i in range(meta[a + "block_count"]):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "attn_q.weight"].T).view(T, H, Dh))
        k = rope((h @ w[p + "attn_k.weight"].T).view(T, G, Dh)).repeat_interleave(H // G, dim=1)
        v = (h @ w[p + "attn_v.weight"].T).view(T, G, Dh).repeat_interleave(H // G, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(Dh)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, H * Dh)
        x = x + out @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        probs = (h @ w[p + "ffn_gate_inp.weight"].T).softmax(-1)  # (T, E)
        top_w, top_e = probs.topk(K, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for t in range(T):
            for j in range(K):
                e = int(top_e[t, j])
                g = h[t] @ w[p + "ffn_gate_exps.weight"][e].T
                u = h[t] @ w[p + "ffn_up_exps.weight"][e].T
                y[t] += top_w[t, j] * ((torch.nn.functional.silu(g) * u) @ w[p + "ffn_down_exps.weight"][e].T)
        x = x + y
    head = w.get("output.weight", w["token_embd.weight"])
    return norm(x, w["output_norm.weight"]) @ head.T


@pytest.mark.parametrize("tied", [False, True])
def test_the_file_computes_our_models_logits_with_llama_cpps_conventions(tmp_path, tied):
    cfg = CFG.replace(tie_embeddings=tied)
    model = build_model(cfg, seed=1)
    tok = Tokenizer.train(["to be or not to be, that is the question\n" * 50], vocab_size=300)
    save(model, tok, tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    tokens = [5, 17, 42, 99, 3, 250, 7, 7, 12]
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0]
    got = ggml_forward(tmp_path / "m.gguf", tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    names = {t.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert ("output.weight" in names) != tied  # tied: llama.cpp reads token_embd as the head


def test_q8_0_file_holds_the_weights_blocks_and_the_tokenizer(tmp_path, model_dir):
    assert main(["export", "--model", str(model_dir), "--gguf", str(tmp_path / "m.gguf")]) == 0
    reader = GGUFReader(tmp_path / "m.gguf")
    meta, tensors = _fields(reader), {t.name: t for t in reader.tensors}
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 7  # mostly Q8_0
    assert meta["llama.expert_count"] == 4 and meta["llama.expert_used_count"] == 2
    assert meta["llama.attention.head_count_kv"] == 1 and meta["llama.context_length"] == 64
    tok = Tokenizer.load(model_dir)
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == 300
    assert meta["tokenizer.ggml.tokens"][tok.eos_id] == tok.id_to_token(tok.eos_id)
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert meta["tokenizer.chat_template"] == tok.chat_template
    model = build_model(CFG, seed=0)
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type == GGMLQuantizationType.Q8_0 and q.shape.tolist() == [64, 64]
    want = quantize(interleave_heads(model.layers[1].attn.wq.weight.detach(), CFG.n_heads).numpy(),
                    GGMLQuantizationType.Q8_0)
    assert q.data.tobytes() == want.tobytes()
    gate = tensors["blk.0.ffn_gate_exps.weight"]
    assert gate.shape.tolist() == [64, 96, 4]  # (D, F, E), innermost first
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == GGMLQuantizationType.F32  # the router stays f32


def test_a_quantized_directory_exports_its_dequantized_weights(tmp_path, model_dir):
    save(quantize_model(build_model(CFG, seed=0), parse_scheme("int8")), Tokenizer.load(model_dir), tmp_path / "q")
    export_gguf(tmp_path / "q", tmp_path / "q.gguf", "f32")
    w = _weights(GGUFReader(tmp_path / "q.gguf"))
    from moegpt.checkpoint.model_dir import load

    model = load(tmp_path / "q").model
    assert torch.equal(w["blk.0.ffn_down_exps.weight"], model.layers[0].ffn.experts.w_down)


def test_what_the_exporter_cannot_write_is_a_one_line_error(tmp_path, model_dir, capsys):
    tok = Tokenizer.load(model_dir)
    save(build_model(CFG.replace(d_ff=40), seed=0), tok, tmp_path / "odd")
    save(build_model(CFG.replace(rope_scaling=RopeScaling(type=RopeType.YARN, factor=4.0, original_max_seq_len=16)),
                     seed=0), tok, tmp_path / "yarn")
    for model, message in (("odd", "--type q8_0 quantizes rows in blocks of 32: d_ff = 40 is not a multiple"),
                           ("yarn", "GGUF export writes linear rope scaling only; this model has yarn")):
        with pytest.raises(SystemExit) as e:
            main(["export", "--model", str(tmp_path / model), "--gguf", str(tmp_path / "x.gguf")])
        assert e.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "x.gguf").exists()


def test_a_tokenizer_smaller_than_the_vocabulary_is_padded_to_one_token_per_logit(tmp_path, model_dir):
    save(build_model(CFG.replace(vocab_size=320), seed=0), Tokenizer.load(model_dir), tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    meta = _fields(GGUFReader(tmp_path / "m.gguf"))
    assert len(meta["tokenizer.ggml.tokens"]) == 320 and meta["tokenizer.ggml.tokens"][-1] == "<|unused_319|>"
    assert meta["tokenizer.ggml.token_type"][300:] == [3] * 20  # control: never produced by tokenizing text


def test_linear_rope_scaling_goes_in_llama_cpps_keys(tmp_path, model_dir):
    cfg = CFG.replace(rope_scaling=RopeScaling(type=RopeType.LINEAR, factor=2.0), max_seq_len=128)
    save(build_model(cfg, seed=0), Tokenizer.load(model_dir), tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    meta = _fields(GGUFReader(tmp_path / "m.gguf"))
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 2.0
    assert "llama.rope.scaling.original_context_length" not in meta  # not given: not written


def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused(tmp_path, model_dir):
    from tokenizers import pre_tokenizers

    tok = Tokenizer.load(model_dir)
    tok.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    save(build_model(CFG, seed=0), tok, tmp_path / "m")
    with pytest.raises(ValueError, match="no normalizer, no prefix space.*a prefix space"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
