"""Teacher-forced logits through the decode program equal the model's forward for a full-precision
model, and follow the decode kernels' int8 activations for a quantized one."""

import torch

from moegpt.config import preset
from moegpt.infer.decode_eval import decoded_logits
from moegpt.model import build_model
from moegpt.quant.model import quantize_model
from moegpt.quant.scheme import QuantScheme


def _model():
    return build_model(preset("tiny").replace(vocab_size=200, n_layers=2, max_seq_len=64), seed=2).eval()


def test_decoded_logits_are_the_forward_logits_for_a_full_precision_model():
    model = _model()
    x = torch.randint(0, 200, (3, 37), generator=torch.Generator().manual_seed(0))  # past two cache blocks of 16
    got = torch.stack(list(decoded_logits(model, x)), 1)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x).logits, rtol=1e-4, atol=1e-4)


def test_a_quantized_model_decodes_close_to_its_forward_but_not_bitwise():
    model = quantize_model(_model(), QuantScheme(bits=8))
    x = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(1))
    got = torch.stack(list(decoded_logits(model, x)), 1)
    with torch.no_grad():
        want = model(x).logits
    err = (got - want).abs().max()
    assert 0 < err < 0.1 * want.abs().max()  # int8 activations: near the forward, yet not the same numbers
