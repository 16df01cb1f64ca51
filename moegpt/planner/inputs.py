"""PlanInputs: every input of a plan, resolved (defaults applied) and checked, as frozen dataclasses.

``make_inputs(...)`` is the one place inputs are validated: a bad value raises a one-line
ValueError naming it, before any arithmetic. Units: counts, bytes, seconds, USD; fractions 0..1.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from moegpt.config import ModelConfig
from moegpt.vision_config import VisionConfig, tower_preset
from moegpt.planner.hardware import Hardware, datasheet
from moegpt.planner.presets import planner_preset, reshaped, with_total_params

MODES = ("inference", "train")
KV_SHARDINGS = ("replicated", "batch")  # batch: TP ranks that would hold a copy of a KV head hold other sequences
DEFAULT_TOKENS_PER_WORD = 4 / 3  # English rule of thumb: ~0.75 words per token
BYTE_WIDTHS = (1, 2, 4)  # 8-bit, 16-bit (bf16/fp16), fp32
WEIGHT_WIDTHS = (0.5,) + BYTE_WIDTHS  # and 4-bit weights
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float8_e4m3fn": 1, "int8": 1}


def model_dir_weight_bytes(directory: str | Path) -> float:
    """Bytes per weight as a directory stores its matmul weights: a quantized directory's bits / 8
    (compressed-tensors' quantization_config: int8 and fp8 1, int4 0.5; the scales, ~1/32 of a byte
    per weight at most, are not counted), else ``model_dir_bytes``."""
    try:
        q = json.loads((Path(directory) / "config.json").read_text()).get("quantization_config")
        groups = list((q or {}).get("config_groups", {}).values())
        bits = groups[0]["weights"]["num_bits"] if groups else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        bits = None  # (read_config reports a broken config.json; load checks a quantization_config)
    if bits == 8:
        return 1
    return 0.5 if bits == 4 else model_dir_bytes(directory)


def model_dir_bytes(directory: str | Path) -> int:
    """Bytes per weight of a model directory: config.json's ``torch_dtype`` (``dtype`` in newer
    transformers; float32 -> 4, bfloat16/float16 -> 2); 2 when it names none. ``--weight-bytes`` and
    ``--kv-bytes`` default to this with ``--model DIR``: the engine keeps both in the stored dtype."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
        dtype = config.get("torch_dtype", config.get("dtype"))
    except (OSError, ValueError, AttributeError):
        return 2  # read_config reports a missing or broken config.json
    if dtype is None:
        return 2
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"{directory}: torch_dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


@dataclass(frozen=True, kw_only=True)
class Layout:
    tp: int
    pp: int
    dp: float  # an integer, unless --gpus is not a multiple of tp*pp (then NON_INTEGER_DP)
    ep: int  # experts sharded over ep data-parallel replicas
    kv_sharding: str
    zero_stage: int  # 1: optimizer state sharded over dp; 2: + gradients; 3: + weights
    micro_batch: int  # sequences per pipeline micro-batch (training)

    @property
    def gpus(self) -> float:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True, kw_only=True)
class Workload:
    batch: int  # sequences decoded together by one replica (inference)
    context: int  # KV length each sequence attends to
    seq_len: int  # training sequence length
    batch_tokens: int  # training global batch, tokens
    tokens: float | None  # training tokens D


@dataclass(frozen=True, kw_only=True)
class Precision:
    weight_bytes: float  # 0.5 for 4-bit weights
    kv_bytes: int
    kv_scale_bytes: int = 0  # per kv head of each token's K and V: counts.KV_SCALE_BYTES for an 8-bit cache


@dataclass(frozen=True, kw_only=True)
class Efficiency:
    mfu: float | None  # given: fixes throughput (inference cost) or training time
    hbm_efficiency: float
    flops_efficiency: float
    overhead_factor: float  # bytes moved per weight byte read (article's chart: 2, "overhead = parameter reads")


@dataclass(frozen=True, kw_only=True)
class MeasuredEfficiency:
    """What ``--measure-efficiency`` measured on this machine (moegpt.planner.local_decode), in seconds
    per decode step: hbm_efficiency is the roofline's memory time over the measured time of streaming
    the weights and KV cache; the software time is added to the stage time on its own (it does not
    scale with the bytes read)."""

    t_roofline_mem_s: float  # the decode roofline's memory time at hbm_efficiency 1 (weights + KV)
    t_matmul_s: float  # the step's weight matrix products at the model's shapes, weights cold
    t_kv_s: float  # the KV cache's bytes at the read bandwidth (counted once: the shrunk model's is tiny)
    t_software_s: float  # LLMEngine's step on the same architecture at tiny widths

    @property
    def t_step_s(self) -> float:
        return self.t_matmul_s + self.t_kv_s + self.t_software_s

    @property
    def eta(self) -> float:
        """The measured bandwidth efficiency; above 1 when the reads beat the roofline (weights in the cache)."""
        return self.t_roofline_mem_s / (self.t_matmul_s + self.t_kv_s)

    @property
    def hbm_efficiency(self) -> float:
        """What the plan uses: eta, at most 1 (the read bandwidth is a memory figure, not a cache one)."""
        return min(self.eta, 1.0)


@dataclass(frozen=True, kw_only=True)
class Options:
    target_tps: float | None
    words_per_min: float | None
    tokens_per_word: float | None
    draft_tokens: int | None
    acceptance_rate: float | None
    compare_preset: str
    compare_tokens: float | None
    train_flops: float | None
    tokens_per_param: float
    nic_gbps_per_gpu: float | None
    bytes_per_token_text: float | None
    bytes_per_token_vision: float | None
    embedding_lookup: bool = False  # an untied input embedding is a lookup: b rows read, no FLOPs (decode.py)
    measured_efficiency: MeasuredEfficiency | None = None  # hbm_efficiency measured (--measure-efficiency)


@dataclass(frozen=True, kw_only=True)
class PlanInputs:
    preset: str  # a preset name, or the model directory
    model: ModelConfig
    hardware: Hardware
    mode: str
    layout: Layout
    workload: Workload
    precision: Precision
    efficiency: Efficiency
    gpu_hour_usd: float | None
    days: float | None
    options: Options
    compare_model: ModelConfig
    vision: VisionConfig | None = None  # a Flamingo-style image side joined to the model (the vision section)

    @property
    def gpus(self) -> float:
        return self.layout.gpus

    def to_dict(self) -> dict:
        """The JSON ``inputs`` echo: exactly PLANNER.md's list (the other options show in the sections
        they feed: ``derived``, ``decode``'s target and speculative fields)."""
        gpus = self.gpus
        return {
            "preset": self.preset, "hardware": self.hardware.name, "mode": self.mode,
            "parallelism": asdict(self.layout), "workload": asdict(self.workload),
            "precision": asdict(self.precision), "efficiency": asdict(self.efficiency),
            "prices": {"gpu_hour_usd": self.gpu_hour_usd},
            "gpus": int(gpus) if float(gpus).is_integer() else gpus, "days": self.days,
        }


def _int(flag: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{flag} {value!r} must be an integer >= {minimum}")
    return value


def _pos(flag: str, value, upper: float | None = None):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{flag} {value!r} must be a positive number")
    if upper is not None and value > upper:
        raise ValueError(f"{flag} {value!r} must be at most {upper:g}")
    return value


def _choice(flag: str, value, choices) -> object:
    if value not in choices:
        raise ValueError(f"{flag} {value!r} is not one of {list(choices)}")
    return value


def make_inputs(*, preset: str = "gpt4", model: ModelConfig | None = None, overrides: dict | None = None,
                params: float | None = None, hardware: str | Hardware = "a100-40gb", mode: str = "inference",
                tp: int = 1, pp: int = 1, dp: int | None = None, gpus: int | None = None, ep: int = 1,
                batch: int = 1, context: int | None = None, seq_len: int | None = None,
                batch_tokens: int | None = None, tokens: float | None = None, weight_bytes: int = 2,
                kv_bytes: int = 2, kv_scale_bytes: int = 0, kv_sharding: str = "replicated", zero_stage: int = 0, micro_batch: int = 1,
                mfu: float | None = None, hbm_efficiency: float = 1.0, flops_efficiency: float = 1.0,
                overhead_factor: float = 1.0, days: float | None = None, gpu_hour_usd: float | None = None,
                target_tps: float | None = None, words_per_min: float | None = None,
                tokens_per_word: float | None = None, draft_tokens: int | None = None,
                acceptance_rate: float | None = None, compare_preset: str = "davinci",
                compare_tokens: float | None = None, train_flops: float | None = None,
                tokens_per_param: float = 20.0, nic_gbps_per_gpu: float | None = None,
                bytes_per_token_text: float | None = None,
                bytes_per_token_vision: float | None = None, embedding_lookup: bool | None = None,
                vision: VisionConfig | None = None, vision_tower: str | None = None,
                cross_attention_every: int | None = None) -> PlanInputs:
    """Resolve and check every input; the keyword names mirror the CLI's flags.

    ``embedding_lookup=None`` turns the refinement on for measured hardware (``local``): that plan
    predicts our engine, which looks rows up; datasheet plans follow the reference algorithm."""
    cfg = model if model is not None else planner_preset(preset)
    if overrides:
        cfg = reshaped(cfg, **overrides)
    if params is not None:
        cfg = with_total_params(cfg, params)
    if vision_tower is not None:  # a tower preset joined to the (reshaped) model, as `moegpt info --vision`
        if vision is not None:
            raise ValueError(f"--vision {vision_tower}: the model directory has its own vision part")
        every = _int("--cross-attention-every", 4 if cross_attention_every is None else cross_attention_every)
        vision = VisionConfig.for_text(cfg, tower_preset(vision_tower), cross_attention_every=every)
    elif cross_attention_every is not None:
        raise ValueError(f"--cross-attention-every {cross_attention_every} goes with --vision TOWER")
    if vision is not None:
        vision.check_fits(cfg)
    hw = hardware if isinstance(hardware, Hardware) else datasheet(hardware)
    if embedding_lookup is None:
        embedding_lookup = hw.measured_on is not None
    _choice("--mode", mode, MODES)
    for flag, v in (("--tp", tp), ("--pp", pp), ("--ep", ep), ("--batch", batch), ("--micro-batch", micro_batch)):
        _int(flag, v)
    _choice("--kv-sharding", kv_sharding, KV_SHARDINGS)
    _choice("--zero-stage", zero_stage, (0, 1, 2, 3))
    _choice("--weight-bytes", weight_bytes, WEIGHT_WIDTHS)
    _choice("--kv-bytes", kv_bytes, BYTE_WIDTHS)
    hw.peak_for(weight_bytes)  # 8-bit weights need an 8-bit peak, fp32 weights an fp32 one (local)
    if cfg.n_heads % tp:
        raise ValueError(f"--tp {tp} does not divide n_heads ({cfg.n_heads})")
    if tp > hw.gpus_per_nvlink_domain:
        raise ValueError(f"--tp {tp} exceeds {hw.name}'s NVLink domain of {hw.gpus_per_nvlink_domain} GPU(s)")
    if pp > cfg.n_layers:
        raise ValueError(f"--pp {pp} exceeds n_layers ({cfg.n_layers})")
    if cfg.n_experts % ep:
        raise ValueError(f"--ep {ep} does not divide n_experts ({cfg.n_experts})")
    if gpus is not None:
        _int("--gpus", gpus)
        if gpus < tp * pp:
            raise ValueError(f"--gpus {gpus} is fewer than tp*pp = {tp * pp}")
        if dp is not None and dp * tp * pp != gpus:
            raise ValueError(f"tp({tp}) * pp({pp}) * dp({dp}) != gpus({gpus})")
        dp_value: float = gpus // (tp * pp) if gpus % (tp * pp) == 0 else gpus / (tp * pp)
    else:
        dp_value = _int("--dp", dp) if dp is not None else 1
    if ep > dp_value or (float(dp_value).is_integer() and int(dp_value) % ep):
        raise ValueError(f"--ep {ep} does not divide dp ({dp_value:g}): expert ranks are data-parallel replicas")
    context = _int("--context", context) if context is not None else cfg.max_seq_len
    seq_len = _int("--seq-len", seq_len) if seq_len is not None else cfg.max_seq_len
    if batch_tokens is None:
        batch_tokens = math.ceil(dp_value) * micro_batch * seq_len  # one micro-batch per replica
    _int("--batch-tokens", batch_tokens)
    for flag, v in (("--tokens", tokens), ("--days", days), ("--gpu-hour-usd", gpu_hour_usd),
                    ("--target-tps", target_tps), ("--words-per-min", words_per_min),
                    ("--tokens-per-word", tokens_per_word), ("--compare-tokens", compare_tokens),
                    ("--train-flops", train_flops), ("--tokens-per-param", tokens_per_param),
                    ("--nic-gbps-per-gpu", nic_gbps_per_gpu), ("--bytes-per-token-text", bytes_per_token_text),
                    ("--bytes-per-token-vision", bytes_per_token_vision), ("--overhead-factor", overhead_factor)):
        _pos(flag, v)
    for flag, v in (("--mfu", mfu), ("--hbm-efficiency", hbm_efficiency), ("--flops-efficiency", flops_efficiency),
                    ("--acceptance-rate", acceptance_rate)):
        _pos(flag, v, upper=1.0)
    if (draft_tokens is None) != (acceptance_rate is None):
        raise ValueError("--draft-tokens and --acceptance-rate go together")
    if draft_tokens is not None:
        _int("--draft-tokens", draft_tokens)
    if mode == "train" and mfu is not None and days is not None:
        raise ValueError(f"--mfu {mfu:g} and --days {days:g}: give one (each determines the other)")
    if tokens is not None and train_flops is not None:
        raise ValueError("--tokens and --train-flops: give one (train FLOPs = 6 * active * tokens)")
    if words_per_min is not None and tokens_per_word is None:
        tokens_per_word = DEFAULT_TOKENS_PER_WORD
    return PlanInputs(
        preset=preset, model=cfg, hardware=hw, mode=mode,
        layout=Layout(tp=tp, pp=pp, dp=dp_value, ep=ep, kv_sharding=kv_sharding, zero_stage=zero_stage,
                      micro_batch=micro_batch),
        workload=Workload(batch=batch, context=context, seq_len=seq_len, batch_tokens=batch_tokens, tokens=tokens),
        precision=Precision(weight_bytes=weight_bytes, kv_bytes=kv_bytes, kv_scale_bytes=kv_scale_bytes),
        efficiency=Efficiency(mfu=mfu, hbm_efficiency=hbm_efficiency, flops_efficiency=flops_efficiency,
                              overhead_factor=overhead_factor),
        gpu_hour_usd=gpu_hour_usd, days=days,
        options=Options(target_tps=target_tps, words_per_min=words_per_min, tokens_per_word=tokens_per_word,
                        draft_tokens=draft_tokens, acceptance_rate=acceptance_rate, compare_preset=compare_preset,
                        compare_tokens=compare_tokens, train_flops=train_flops, tokens_per_param=tokens_per_param,
                        nic_gbps_per_gpu=nic_gbps_per_gpu, bytes_per_token_text=bytes_per_token_text,
                        bytes_per_token_vision=bytes_per_token_vision, embedding_lookup=bool(embedding_lookup)),
        compare_model=planner_preset(compare_preset), vision=vision,
    )
