"""models/quant_check.py: the one-line warning when bitsandbytes' 4-bit product is not its own weight's."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from sharp_cli.models import quant_check  # noqa: E402


def four_bit_model(k=256, n=128):
    """A module holding one bitsandbytes nf4 layer (double-quantized, as sharp loads them), on the CPU."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.02
    layer = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
    return torch.nn.Sequential(torch.nn.Identity(), layer.to("cpu")), w


def test_a_correct_product_is_near_its_dequantized_weight_and_quiet():
    model, _ = four_bit_model()
    assert quant_check.four_bit_error(model) < 1e-4
    assert quant_check.warning(model) is None


def test_a_product_of_another_matrix_is_named_in_one_line(monkeypatch):
    # A product of another matrix (what a bitsandbytes build that does not fit the GPU can return).
    model, w = four_bit_model()
    layer = model[1]
    other = torch.randn_like(w) * 0.02
    monkeypatch.setattr(layer, "forward", lambda x: x @ other.T + layer.bias)
    error = quant_check.four_bit_error(model)
    assert error > 1.0
    line = quant_check.warning(model)
    assert line.startswith("warning: bitsandbytes ") and "--quant none" in line and "\n" not in line


def test_quantization_alone_is_not_flagged():
    # The product against the *original* weight differs by quantization (~0.1), which must not count:
    # the check compares with the dequantized weight.
    model, w = four_bit_model()
    x = torch.randn(1, w.shape[1])
    dense = x.double() @ w.double().T + model[1].bias.double()
    assert ((model[1](x).double() - dense).norm() / dense.norm()).item() > quant_check.LIMIT / 5
    assert quant_check.warning(model) is None


def test_no_four_bit_layer_no_check():
    assert quant_check.four_bit_error(torch.nn.Linear(4, 4)) is None


def test_a_check_that_cannot_run_never_stops_a_load(monkeypatch):
    model, _ = four_bit_model()
    monkeypatch.setattr(model[1], "forward", lambda x: (_ for _ in ()).throw(RuntimeError("another bitsandbytes")))
    assert quant_check.warning(model) is None
