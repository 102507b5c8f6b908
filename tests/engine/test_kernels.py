"""Every linear form a slot step may take computes what F.linear computes, on several shapes, on any CPU."""

import pytest
import torch
import torch.nn.functional as F

from steering_app.engine.serving.kernels import PackedLinear, TransposedLinear, can_pack, packed_weight

SHAPES = [(1, 32, 64), (3, 32, 64), (8, 48, 96), (5, 576, 200), (24, 64, 1536)]  # rows, in, out


def _linear(inputs: int, outputs: int, bias: bool) -> torch.nn.Linear:
    torch.manual_seed(inputs * outputs)
    return torch.nn.Linear(inputs, outputs, bias=bias).eval().requires_grad_(False)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(("rows", "inputs", "outputs"), SHAPES)
@pytest.mark.parametrize("form", ["W@x.T", "packed"])
def test_each_form_computes_f_linear(form, rows, inputs, outputs, bias):
    module = _linear(inputs, outputs, bias)
    x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(rows))
    expected = F.linear(x, module.weight, module.bias)
    if form == "packed":
        if not can_pack(module.weight):
            pytest.skip("no MKL packed sgemm on this build: the packed form is never chosen here")
        module.__dict__["packed_weight"] = packed_weight(module)
        module.__class__ = PackedLinear
    else:
        module.__class__ = TransposedLinear
    with torch.inference_mode():
        got = module(x)
        batched = module(x.view(1, rows, inputs))  # [batch, seq, in], as a step's hidden states
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(batched[0], expected, rtol=1e-5, atol=1e-5)
