"""The C++ decode kernels against their pure-PyTorch references, and the fallback without a compiler."""

import pytest
import torch

import moegpt.kernels as kernels
from moegpt.kernels import gemv_reference


def _stored(w: torch.Tensor, in_by_out: bool) -> torch.Tensor:
    """The same values stored (in, out) (the decode layout of fp32 weights) or (out, in)."""
    return w.transpose(-2, -1).contiguous().transpose(-2, -1) if in_by_out else w.contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_by_out", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_gemv_is_its_reference(dtype, in_by_out, rows):
    assert kernels.available()  # the machines we test on have a compiler: the kernels must build
    g = torch.Generator().manual_seed(rows)
    w = _stored(torch.randn(301, 67, generator=g).to(dtype), in_by_out)  # odd sizes: no tail assumed
    x = torch.randn(rows, 67, generator=g).to(dtype)
    got = torch.ops.moegpt.gemv(x, w)
    assert got.dtype == dtype and got.shape == (rows, 301)
    torch.testing.assert_close(got.float(), gemv_reference(x, w).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gemv_row_does_not_depend_on_the_rows_beside_it(dtype):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(130, 77, generator=g).to(dtype), torch.randn(8, 77, generator=g).to(dtype)
    got = torch.ops.moegpt.gemv(x, w)
    for m in range(8):  # alone, a row gets bitwise what it got beside the others: batch invariant
        assert torch.equal(torch.ops.moegpt.gemv(x[m:m + 1], w)[0], got[m])


def test_empty_products_are_empty_or_zero():
    assert torch.ops.moegpt.gemv(torch.zeros(0, 64), torch.randn(256, 64)).shape == (0, 256)
    assert torch.equal(torch.ops.moegpt.gemv(torch.zeros(5, 0), torch.zeros(3, 0)), torch.zeros(5, 3))


def test_bad_inputs_are_errors_naming_the_shapes():
    with pytest.raises(RuntimeError, match=r"x \(M, I\) and w \(O, I\)"):
        torch.ops.moegpt.gemv(torch.randn(2, 9), torch.randn(5, 8))


def test_without_a_compiler_one_line_says_so_and_the_references_run(monkeypatch, capsys):
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    kernels.available.cache_clear()
    try:
        assert not kernels.available()
        assert capsys.readouterr().err.strip() == "moegpt: no C++ compiler found: decoding uses the pure-PyTorch kernels"
        x, w = torch.randn(1, 8), torch.randn(4, 8)
        assert not kernels.gemv_applies(x, w)
    finally:
        kernels.available.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_models(dtype):
    from moegpt.model.layers import rms_norm

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 77, generator=g).to(dtype), torch.randn(77, generator=g).to(dtype)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(torch.ops.moegpt.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), **tol)
