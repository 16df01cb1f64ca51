"""The grouped MoE fast path against a per-token loop (the oracle), plus routing semantics."""

import pytest
import torch
import torch.nn.functional as F

from moegpt.config import MLPKind, PRESETS
from moegpt.model.moe import MoE, load_balancing_loss, route


def mlp_forward(x, w_up, w_down, w_gate, kind):
    """One expert, written out: SwiGLU down(silu(gate x) * up x), or GELU down(gelu(up x))."""
    if kind == MLPKind.SWIGLU:
        return (F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()
    return F.gelu(x @ w_up.t(), approximate="tanh") @ w_down.t()


def _moe(kind=MLPKind.SWIGLU, capacity_factor=None, seed=0):
    cfg = PRESETS["tiny"].replace(d_model=32, d_ff=48, n_experts=8, top_k=2, mlp=kind, capacity_factor=capacity_factor)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return moe


def per_token_oracle(moe: MoE, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Slow and obvious: for each token in order, softmax, top-k, renormalise, sum weighted expert
    outputs; with a capacity, an expert takes only its first ``capacity`` assignments."""
    B, T, D = x.shape
    out = torch.zeros_like(x)
    ex = moe.experts
    taken = [0] * moe.n_experts
    for b in range(B):
        for t in range(T):
            h = x[b, t]
            probs = F.softmax(moe.router.weight @ h, dim=-1)
            w, idx = probs.topk(moe.top_k)
            w = w / w.sum()
            for wi, e in zip(w, idx.tolist()):
                taken[e] += 1
                if capacity is not None and taken[e] > capacity:
                    continue  # dropped: this expert is full
                gate = ex.w_gate[e] if ex.w_gate is not None else None
                out[b, t] += wi * mlp_forward(h[None], ex.w_up[e], ex.w_down[e], gate, ex.kind)[0]
    return out


@pytest.mark.parametrize("kind", list(MLPKind))
def test_grouped_experts_match_per_token_oracle(kind):
    moe = _moe(kind)
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, stats = moe(x)
        torch.testing.assert_close(y, per_token_oracle(moe, x), rtol=1e-5, atol=1e-5)
    assert stats.expert_counts.sum().item() == 3 * 11 * 2
    assert stats.dropped.item() == 0


def test_gradients_match_oracle():
    moe = _moe()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    moe(x)[0].square().sum().backward()
    fast = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    per_token_oracle(moe, x).square().sum().backward()
    for a, b in zip(fast, [p.grad for p in moe.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_drops_assignments_past_the_limit():
    logits = torch.zeros(6, 2)
    logits[:, 0] = 5.0  # every token prefers expert 0
    routing, _, counts = route(logits, top_k=1, capacity=2)
    assert counts.tolist() == [6, 0]
    assert routing.counts.tolist() == [2, 0]
    assert routing.token.tolist() == [0, 1]  # earliest tokens keep their slot


def test_capacity_factor_matches_oracle_that_fills_experts_in_token_order():
    moe = _moe(capacity_factor=0.5)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y, stats = moe(x)
        capacity = moe.capacity(32)  # ceil(0.5 * 32 * 2 / 8) = 4
        torch.testing.assert_close(y, per_token_oracle(moe, x, capacity), rtol=1e-5, atol=1e-5)
    assert capacity == 4
    assert stats.dropped.item() == (stats.expert_counts - capacity).clamp(min=0).sum().item() > 0


def test_balance_loss_is_one_for_uniform_routing_and_larger_when_skewed():
    N, E, K = 64, 8, 2
    probs = torch.full((N, E), 1.0 / E)
    uniform_counts = torch.full((E,), N * K // E)
    assert load_balancing_loss(probs, uniform_counts, K).item() == pytest.approx(1.0)
    skewed = torch.zeros(N, E)
    skewed[:, :2] = 0.5
    assert load_balancing_loss(skewed, torch.tensor([N, N] + [0] * 6), K).item() == pytest.approx(4.0)


def test_routing_weights_are_renormalised_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    routing, probs, _ = route(logits, top_k=2, capacity=None)
    assert sorted(routing.token.tolist()) == [0, 0]
    assert routing.weight.sum().item() == pytest.approx(1.0)
    p = probs[0, :2]
    assert sorted(routing.weight.tolist()) == pytest.approx(sorted((p / p.sum()).tolist()))


@pytest.mark.parametrize("kind", list(MLPKind))
def test_dense_layer_is_one_expert_that_every_token_uses(kind):
    from moegpt.model.experts import DenseMLP

    torch.manual_seed(0)
    dense = DenseMLP(32, 48, kind)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, 32)
    m = dense.mlp
    gate = m.w_gate[0] if m.w_gate is not None else None
    expected = mlp_forward(x.reshape(10, 32), m.w_up[0], m.w_down[0], gate, kind).view(2, 5, 32)
    y, stats = dense(x)
    assert stats is None
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_dropless_combine_equals_index_add_exactly():
    """The un-sort-and-sum combine against index_add over the grouped rows (the obvious scatter)."""
    from moegpt.model.moe import route

    moe = _moe()
    x = torch.randn(4, 9, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, _ = moe(x)
        flat = x.reshape(-1, 32)
        routing, _, _ = route(moe.router(flat), moe.top_k, None)
        rows = moe.experts(flat[routing.token], routing.counts) * routing.weight[:, None]
        expected = torch.zeros_like(flat).index_add_(0, routing.token, rows)
    assert torch.equal(y.reshape(-1, 32), expected)  # top-2: one addition either way


def test_router_losses_are_computed_only_when_read_and_match_the_formulas():
    moe = _moe()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    _, stats = moe(x)
    probs = F.softmax(stats.logits, dim=-1)
    torch.testing.assert_close(stats.aux_loss, load_balancing_loss(probs, stats.expert_counts, moe.top_k))
    torch.testing.assert_close(stats.z_loss, torch.logsumexp(stats.logits, -1).pow(2).mean())
    stats.aux_loss.backward()  # differentiable: training backpropagates through the router
    assert moe.router.weight.grad is not None
