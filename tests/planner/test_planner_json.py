"""`moegpt plan --json` has exactly PLANNER.md's sections and fields (and the vision section issue 15
added: schema 1.1), null where not applicable."""

import argparse
import json

import pytest

from moegpt.planner.cli import add_plan_parser

SECTIONS = {
    "hardware": {"name", "mem_bytes", "hbm_bytes_per_s", "peak_flops", "nvlink_bytes_per_s", "nic_bits_per_s_per_gpu",
                 "gpus_per_nvlink_domain", "ridge_flop_per_byte"},
    "model": {"n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "gated_mlp", "n_experts", "top_k",
              "vocab_size", "tied_embeddings"},
    "params": {"total", "active_per_token", "shared", "attention", "embedding", "per_expert_mlp", "experts_total",
               "router"},
    "flops": {"forward_per_token", "forward_per_token_dense", "attention_per_token_at_context", "train_per_token"},
    "parallelism": {"gpus", "tp", "pp", "dp", "ep", "nodes", "layers_per_stage"},
    "memory": {"weights_bytes_per_gpu", "weights_params_per_gpu", "weights_params_per_node", "grads_bytes_per_gpu",
               "optimizer_bytes_per_gpu", "activations_bytes_per_gpu", "training_state_bytes_per_gpu",
               "kv_cache_bytes_per_token", "kv_cache_bytes_per_token_per_gpu", "kv_cache_bytes_per_sequence",
               "kv_cache_bytes_total", "kv_cache_bytes_per_gpu", "kv_cache_tp_copies", "kv_cache_bytes_all_gpus",
               "kv_cache_to_weights_ratio", "free_bytes_per_gpu",
               "max_batch_sequences", "fits"},
    "moe": {"tokens_per_expert", "tokens_per_expert_per_weight_read", "expected_experts_touched",
            "expert_weight_fraction_read"},
    "roofline": {"flops_per_param_per_token", "arithmetic_intensity_per_param", "tokens_per_weight_read",
                 "arithmetic_intensity_flop_per_byte_shared", "arithmetic_intensity_flop_per_byte_expert",
                 "ridge_flop_per_byte", "bound"},
    "decode": {"stage_time_s", "t_mem_s", "t_compute_s", "t_comm_s", "per_token_latency_s", "tokens_per_s_per_user",
               "cluster_tokens_per_s", "mfu", "mfu_at_target_tps", "bandwidth_required_bytes_per_s",
               "max_params_for_target_tps", "speculative_tokens_per_pass"},
    "training": {"tokens", "global_batch_tokens", "total_flops", "total_flops_with_attention", "mfu", "days",
                 "gpu_hours", "cost_usd", "step_time_s", "steps", "microbatches_per_replica",
                 "pipeline_bubble_fraction", "dp_allreduce_s"},
    "inference_cost": {"usd_per_1k_tokens", "gpu_hour_usd", "cluster_tokens_per_s", "implied_mfu"},
    "derived": {"reading_speed_tok_s", "params_ratio_vs_gpt3", "active_params_ratio_vs_davinci",
                "train_compute_ratio_vs_gpt3", "chinchilla_token_multiple", "vision_io_ratio"},
    "vision": {"tower_params", "resampler_params", "cross_attention_params", "added_params", "cross_attention_layers",
               "tokens_per_image", "flops_per_image", "cross_attention_flops_per_token"},
}
INPUTS = {"preset", "hardware", "mode", "parallelism", "workload", "precision", "efficiency", "prices", "gpus", "days"}


def run_plan(argv, capsys) -> dict:
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv, "--json"])
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_json_has_exactly_the_planner_fields(mode, capsys):
    d = run_plan(["--mode", mode, "--tp", "8", "--pp", "16", "--gpus", "128", "--tokens", "1e12"], capsys)
    assert set(d) == {"schema_version", "inputs", "warnings", *SECTIONS}
    assert d["schema_version"] == "1.1"
    for section, names in SECTIONS.items():
        assert set(d[section]) == names, section
    assert set(d["inputs"]) == INPUTS
    assert set(d["inputs"]["parallelism"]) == {"tp", "pp", "dp", "ep", "kv_sharding", "zero_stage", "micro_batch"}
    assert set(d["inputs"]["workload"]) == {"batch", "context", "seq_len", "batch_tokens", "tokens"}
    assert set(d["inputs"]["precision"]) == {"weight_bytes", "kv_bytes", "kv_scale_bytes"}
    assert set(d["inputs"]["efficiency"]) == {"mfu", "hbm_efficiency", "flops_efficiency", "overhead_factor"}
    assert set(d["hardware"]["peak_flops"]) == {"bf16", "fp8", "int8"}
    for w in d["warnings"]:
        assert set(w) == {"code", "message"}


def test_fields_of_the_other_mode_are_null(capsys):
    inference = run_plan(["--tp", "8", "--pp", "16", "--gpus", "128"], capsys)
    assert all(v is None for v in inference["training"].values())
    assert inference["memory"]["grads_bytes_per_gpu"] is None
    train = run_plan(["--mode", "train", "--tp", "8", "--pp", "15", "--gpus", "25000", "--tokens", "13e12"], capsys)
    for section in ("decode", "roofline", "inference_cost"):
        assert all(v is None for v in train[section].values())
    assert train["memory"]["max_batch_sequences"] is None
    assert train["training"]["total_flops"] == pytest.approx(6 * train["params"]["active_per_token"] * 13e12)


def test_a_dense_model_has_no_moe_fields(capsys):
    d = run_plan(["--preset", "dense-1t", "--tp", "8", "--gpus", "8"], capsys)
    assert all(v is None for v in d["moe"].values())
    assert d["roofline"]["arithmetic_intensity_flop_per_byte_expert"] is None
    assert d["params"]["router"] == 0 and d["params"]["shared"] == d["params"]["total"]
    assert d["decode"]["tokens_per_s_per_user"] > 0


def test_warnings_carry_codes(capsys):
    d = run_plan(["--mode", "train", "--tp", "8", "--pp", "15", "--gpus", "25000", "--tokens", "13e12",
                  "--batch-tokens", "60e6"], capsys)
    codes = {w["code"] for w in d["warnings"]}
    assert {"NON_INTEGER_DP", "TRAIN_STATE_DOES_NOT_FIT", "PIPELINE_BUBBLE_HIGH"} <= codes
    d = run_plan(["--tp", "8", "--pp", "16", "--gpus", "128", "--batch", "4096", "--target-tps", "8.33"], capsys)
    assert {"KV_HEAD_REPLICATED", "KV_DOES_NOT_FIT", "READING_SPEED"} <= {w["code"] for w in d["warnings"]}
    d = run_plan(["--preset", "gpt4-gqa", "--n-kv-heads", "14", "--tp", "4"], capsys)
    assert "HEADS_NOT_DIVISIBLE_BY_TP" in {w["code"] for w in d["warnings"]}


def test_overrides_and_model_directory(capsys, tmp_path):
    d = run_plan(["--preset", "gpt4", "--n-experts", "8", "--gated-mlp", "--vocab", "50000"], capsys)
    assert (d["model"]["n_experts"], d["model"]["gated_mlp"], d["model"]["vocab_size"]) == (8, True, 50000)
    d = run_plan(["--preset", "dense-1t", "--params", "175e9"], capsys)
    assert d["params"]["total"] == pytest.approx(175e9, rel=0.05)
    from moegpt.checkpoint.hf import config_to_hf
    from moegpt.config import preset

    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(preset("tiny"), 1, 2, 0)))
    d = run_plan(["--model", str(tmp_path)], capsys)
    assert d["model"]["d_model"] == 128 and d["inputs"]["preset"] == str(tmp_path)
