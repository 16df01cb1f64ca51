"""Prometheus metrics, ``moegpt:`` names, in a registry of the server's own (no global state).

Latency histograms are observed by the engine thread as tokens come out; everything the engine
already counts (queue, KV blocks, tokens, preemptions, aborts, speculative acceptance, expert load)
is read from its latest ``Snapshot`` at scrape time, so nothing is counted twice. Names follow
vLLM's where they exist; ``moegpt:load_imbalance`` is the trainer's ``load_imbalance`` (busiest
expert over the mean, averaged over MoE layers), here over the last engine step.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from moegpt.serve.engine_loop import Snapshot

# Seconds; from a fast GPU's decode step to a slow CPU's long request.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)


def load_imbalance(counts: tuple[tuple[int, ...], ...]) -> float:
    """counts (Lm, E) -> mean over layers of max / mean tokens per expert (1.0 is balanced)."""
    ratios = [max(row) / max(sum(row) / len(row), 1e-9) for row in counts if sum(row) > 0]
    return sum(ratios) / len(ratios) if ratios else 1.0


class _EngineCollector:
    def __init__(self, snapshot: Callable[[], Snapshot], dtypes: dict[str, str]):
        self.snapshot, self.dtypes = snapshot, dtypes

    def collect(self):
        s = self.snapshot()
        info = GaugeMetricFamily("moegpt:model_dtypes", "How the served model stores its weights (a dtype, or a "
                                 "quantization scheme such as int8 or int4-g32), computes, and caches keys and values.",
                                 labels=list(self.dtypes))
        info.add_metric(list(self.dtypes.values()), 1)
        yield info

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            return c

        yield gauge("moegpt:num_requests_running", "Sequences in the running batch.", s.running)
        yield gauge("moegpt:num_requests_waiting", "Sequences waiting to run (queued or preempted).", s.waiting)
        yield gauge("moegpt:num_waiting_tokens", "Prompt tokens of the waiting sequences.", s.waiting_tokens)
        yield gauge("moegpt:kv_blocks_total", "KV cache blocks.", s.kv_blocks_total)
        yield gauge("moegpt:kv_blocks_free", "KV cache blocks free (cached prefixes included).", s.kv_blocks_free)
        yield gauge("moegpt:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).",
                    1 - s.kv_blocks_free / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        yield counter("moegpt:engine_steps", "Engine steps run.", s.steps)
        yield counter("moegpt:prompt_tokens", "Prompt tokens run through the model (recomputation included).",
                      s.prompt_tokens)
        yield counter("moegpt:generation_tokens", "Tokens generated.", s.generation_tokens)
        yield counter("moegpt:num_preemptions", "Sequences preempted (to be recomputed).", s.preemptions)
        yield counter("moegpt:num_aborted_requests", "Sequences aborted before they finished.", s.aborted)
        yield counter("moegpt:spec_decode_num_draft_tokens", "Speculative draft tokens verified.", s.spec_proposed)
        yield counter("moegpt:spec_decode_num_accepted_tokens", "Speculative draft tokens accepted.",
                      s.spec_accepted)
        yield gauge("moegpt:spec_decode_acceptance_rate", "Accepted over verified draft tokens (NaN before any).",
                    s.spec_accepted / s.spec_proposed if s.spec_proposed else float("nan"))
        if s.image_blocks_total:  # a vision model
            yield counter("moegpt:images_encoded", "Images run through the vision encoder and resampler.",
                          s.images_encoded)
            yield counter("moegpt:image_cache_hits", "Images whose cross-attention keys and values were cached.",
                          s.image_cache_hits)
            yield gauge("moegpt:image_cache_blocks_total", "Image cache blocks (one image's cross-attention keys "
                        "and values each).", s.image_blocks_total)
            yield gauge("moegpt:image_cache_blocks_used", "Image cache blocks read by requests.", s.image_blocks_used)
        if s.expert_tokens is not None:
            c = CounterMetricFamily("moegpt:expert_tokens", "Tokens routed to each expert, per MoE layer.",
                                    labels=["layer", "expert"])
            for layer, row in enumerate(s.expert_tokens):
                for expert, n in enumerate(row):
                    c.add_metric([str(layer), str(expert)], n)
            yield c
        if s.last_expert_counts is not None:
            g = GaugeMetricFamily("moegpt:expert_batch_size", "Tokens each expert got in the last engine step.",
                                  labels=["layer", "expert"])
            for layer, row in enumerate(s.last_expert_counts):
                for expert, n in enumerate(row):
                    g.add_metric([str(layer), str(expert)], n)
            yield g
            yield gauge("moegpt:load_imbalance", "Busiest expert over the mean, averaged over MoE layers "
                        "(last step; 1 is balanced).", load_imbalance(s.last_expert_counts))


class Metrics:
    def __init__(self, snapshot: Callable[[], Snapshot], dtypes: dict[str, str] | None = None):
        """dtypes: e.g. {"weights": "int8", "activations": "float32", "kv_cache": "float32"}."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("moegpt:time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("moegpt:inter_token_latency_seconds",
                             "Time between a completion's successive token deliveries.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("moegpt:e2e_request_latency_seconds", "Arrival to the last completion finishing.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter("moegpt:request_success", "Completions finished, by finish reason.",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("moegpt:requests_rejected", "HTTP requests refused, by reason.", ["reason"],
                                registry=r)
        r.register(_EngineCollector(snapshot, dtypes or {}))

    def render(self) -> bytes:
        return generate_latest(self.registry)
