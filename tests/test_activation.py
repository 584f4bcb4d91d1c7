"""The activation op (pysparse.activations.apply = torch.ops.pysparse.activation): gelu_tanh on
pysparse's vector kernel against the exact function in fp64, on every ISA and thread count,
16-bit dtypes, special values, views, gradients, compile; the other names are torch's, bit for
bit; FastGELUTanh, the module sparsify swaps in."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pysparse
from pysparse import activations

ISAS = pysparse._C.cpu_isa_supported()
EPS = torch.finfo(torch.float32).eps


@pytest.fixture
def isa_and_threads():
    before = torch.get_num_threads()
    yield
    pysparse.set_cpu_isa("auto")
    torch.set_num_threads(before)


def _inputs(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    return torch.cat([torch.linspace(-30, 30, n), torch.randn(n, generator=gen) * 1e-3,
                      torch.randn(n, generator=gen) * 4])


def _exact(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.double(), approximate="tanh")


def _bound_ok(y: torch.Tensor, x: torch.Tensor) -> bool:
    """|y - exact| <= 2 eps |x| (torch's own tanh form meets eps |x|: its 0.5 x (1 + tanh)
    cancels for x < 0) and, away from the tail, <= 32 ulp of the value itself."""
    err = (y.double() - _exact(x)).abs()
    body = x > -5
    return bool((err <= 2 * EPS * x.double().abs()).all()) and \
        bool((err[body] <= 32 * EPS * _exact(x)[body].abs()).all())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [0, 1, 7, 15, 16, 17, 33, 1000, 70001])
def test_gelu_tanh_against_the_exact_function(isa, n, isa_and_threads):
    pysparse.set_cpu_isa(isa)
    x = _inputs(n)
    y = activations.apply("gelu_tanh", x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert _bound_ok(y, x)
    # torch's own is no closer to the exact function than 2 eps |x| (what _bound_ok allows)
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), rtol=0, atol=2 * EPS * 30)


@pytest.mark.parametrize("isa", ISAS)
def test_gelu_tanh_special_values_as_torch(isa, isa_and_threads):
    pysparse.set_cpu_isa(isa)
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e30, -1e30, 40.0, -40.0, 1e-40, -1e-40])
    y = activations.apply("gelu_tanh", x)
    ref = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(y[:2]), torch.signbit(ref[:2])) and bool(torch.signbit(y[6]))


def test_gelu_tanh_threads_and_vector_tail_bit_identical(isa_and_threads):
    x = _inputs(50001)
    torch.set_num_threads(1)
    one = activations.apply("gelu_tanh", x)
    torch.set_num_threads(2)
    assert torch.equal(activations.apply("gelu_tanh", x), one)
    for cut in (1, 5, 16, 17, 31):  # an element gives the same bits whether in a vector or in the tail
        assert torch.equal(activations.apply("gelu_tanh", x[:cut]), one[:cut])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", ISAS)
def test_gelu_tanh_16_bit_is_the_fp32_result_rounded(dtype, isa, isa_and_threads):
    pysparse.set_cpu_isa(isa)
    x = (torch.randn(4099, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    y = activations.apply("gelu_tanh", x)
    assert y.dtype == dtype
    assert torch.equal(y, activations.apply("gelu_tanh", x.float()).to(dtype))


def test_views_and_other_dtypes():
    base = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    for x in (base.t(), base[:, 1::3], base.expand(2, 6, 40)):
        y = activations.apply("gelu_tanh", x)
        assert y.is_contiguous() and torch.equal(y, activations.apply("gelu_tanh", x.contiguous()))
    d = base.double()  # no vector kernel: torch's
    assert torch.equal(activations.apply("gelu_tanh", d), F.gelu(d, approximate="tanh"))


@pytest.mark.parametrize("name", ["none", "relu", "gelu", "silu"])
def test_the_other_names_are_torchs_bit_for_bit(name):
    x = torch.randn(33, 17, generator=torch.Generator().manual_seed(3)).t()
    y = activations.apply(name, x)
    # (torch's own kernels round a strided input's elements differently: compare on the same layout)
    assert torch.equal(y, activations.ACTIVATIONS[name](x.contiguous())) and y.is_contiguous()
    assert name != "none" or y.data_ptr() != x.data_ptr()  # a new tensor, as the schema says


def test_bad_input_is_one_sentence():
    with pytest.raises(ValueError, match="activation must be one of"):
        activations.apply("swish", torch.ones(3))
    with pytest.raises(TypeError, match="activation input must be a floating-point tensor, got Long"):
        activations.apply("gelu_tanh", torch.ones(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="activation must be none, relu, gelu, gelu_tanh or silu"):
        torch.ops.pysparse.activation(torch.ones(3), "swish")


@pytest.mark.parametrize("name", activations.NAMES)
def test_gradient_is_torchs(name):
    x = torch.randn(5, 37, generator=torch.Generator().manual_seed(4), requires_grad=True)
    g = torch.randn(5, 37, generator=torch.Generator().manual_seed(5))
    got, = torch.autograd.grad(activations.apply(name, x), x, g)
    ref, = torch.autograd.grad(activations.ACTIVATIONS[name](x), x, g)
    assert torch.equal(got, ref)


def test_compiles_in_one_graph():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    f = torch.compile(lambda t: activations.apply("gelu_tanh", t) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x), activations.apply("gelu_tanh", x) * 2)


def test_fast_gelu_tanh_module_and_what_it_replaces():
    from pysparse.nn.fast_act import swap_gelu_tanh
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(approximate="tanh"), torch.nn.GELU(),
                                torch.nn.Linear(8, 8))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(x)
        assert swap_gelu_tanh(model) == ["1"]  # the erf GELU is another function: kept
        assert type(model[1]) is pysparse.nn.FastGELUTanh and type(model[2]) is torch.nn.GELU
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="'2' was a tanh-form GELU made FastGELUTanh, but is a GELU here"):
        swap_gelu_tanh(model, ["2"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", activations.NAMES)
def test_cuda_runs_torchs_kernels(name):
    x = torch.randn(7, 300, device="cuda")
    y = activations.apply(name, x)
    assert y.device == x.device and torch.equal(y, activations.ACTIVATIONS[name](x))
    torch.library.opcheck(torch.ops.pysparse.activation.default, (x, name))
