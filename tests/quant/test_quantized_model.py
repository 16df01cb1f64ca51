"""A quantized expert stack's forward goes expert by expert (quant/model.py: expert_by_expert): the
same outputs as the whole stack dequantized (the model's own Experts.forward), in row and tile
layouts, and a deepcopy runs its own experts."""

import copy

import pytest
import torch

from moegpt.config import preset
from moegpt.infer.decode import decode_weights
from moegpt.model import build_model
from moegpt.model.experts import Experts
from moegpt.quant.model import quantize_model
from moegpt.quant.scheme import parse_scheme


@pytest.mark.parametrize("scheme", [("int8", None), ("int4", 32)])
@pytest.mark.parametrize("tiles", [False, True])
def test_expert_by_expert_is_the_whole_stack_dequantized(scheme, tiles):
    model = quantize_model(build_model(preset("tiny"), seed=0), parse_scheme(*scheme)).eval()
    if tiles:
        decode_weights(model)  # the decode program's tiles
    experts = model.layers[1].ffn.experts
    counts = torch.tensor([5, 0, 3, 0, 0, 7, 1, 0, 0, 0, 2, 0, 0, 0, 0, 4])  # some experts without rows
    x = torch.randn(int(counts.sum()), 128)
    with torch.no_grad():
        got = experts(x, counts)
        want = Experts.forward(experts, x, counts)  # the class's forward: grouped products on the whole stack
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert experts(x[:0], torch.zeros(16, dtype=torch.long)).shape == (0, 128)
        twin = copy.deepcopy(model)
        twin.layers[1].ffn.experts.parametrizations.w_down.original.zero_()  # its own packed bytes: all -128
        assert not torch.allclose(twin.layers[1].ffn.experts(x, counts), got)
        torch.testing.assert_close(experts(x, counts), got, rtol=0, atol=0)  # the original is untouched
