"""Backward of the CSR ops (pysparse/autograd.py) and the op behind it, csr_sddmm.

Gradients of csr_linear and csr_spmm w.r.t. the dense operand, the stored values and the bias
against the fp64 dense computation on the same zeros (every dtype, ISA and index dtype, odd
shapes, empty rows, batches), within the forward's error budget; the pattern never receives a
gradient; opcheck with autograd; a short training of a sparse MLP against the dense model trained
with masks; torch.compile of forward + backward; the cached transpose; bad input."""
from __future__ import annotations

import pytest
import torch

import pysparse
from pysparse import CSR
from pysparse.autograd import transpose
from conftest import CSR_INDEX_DTYPES, assert_close, gen, num_threads, randn, random_sparse, train_losses

ops = torch.ops.pysparse


def _operand(M, K, density, dtype, seed, index_dtype=None):
    W = random_sparse(M, K, density, dtype, gen(seed))
    A = CSR.from_dense(W, index_dtype=index_dtype)
    return W, A


# ---------------------------------------------------------------------------------------------
# csr_sddmm itself

@pytest.mark.parametrize("M,K,n", [(1, 1, 1), (7, 33, 5), (40, 70, 33), (33, 127, 130)])
@pytest.mark.parametrize("index_dtype", CSR_INDEX_DTYPES)
@pytest.mark.parametrize("layout", ["rows", "token-major views"])
def test_sddmm_matches_reference(isa, dtype, M, K, n, index_dtype, layout):
    W, A = _operand(M, K, 0.3, dtype, M + K + n, index_dtype)
    a, b = randn(M, n, dtype=dtype, g=gen(1)), randn(K, n, dtype=dtype, g=gen(2))
    if layout != "rows":  # (n, M) and (n, K) tensors seen transposed, as the linear backward passes them
        a, b = a.t().contiguous().t(), b.t().contiguous().t()
    out = ops.csr_sddmm(A.crow_indices, A.col_indices, [M, K], a, b)
    mask = W != 0
    ref = (a.double() @ b.double().t())[mask]
    absref = (a.double().abs() @ b.double().abs().t())[mask]
    assert_close(out, ref, absref, dtype, what=f"{isa} sddmm")


def test_sddmm_empty_and_bad_input():
    A = CSR.from_dense(torch.zeros(4, 6))
    assert ops.csr_sddmm(A.crow_indices, A.col_indices, [4, 6], torch.randn(4, 3), torch.randn(6, 3)).shape == (0,)
    W, A = _operand(5, 6, 0.5, torch.float32, 0)
    crow, col = A.crow_indices, A.col_indices
    with pytest.raises(RuntimeError, match="a must have the matrix's 5 rows"):
        ops.csr_sddmm(crow, col, [5, 6], torch.randn(4, 3), torch.randn(6, 3))
    with pytest.raises(RuntimeError, match="same number of columns"):
        ops.csr_sddmm(crow, col, [5, 6], torch.randn(5, 3), torch.randn(6, 2))
    with pytest.raises(TypeError, match="must share a dtype"):
        ops.csr_sddmm(crow, col, [5, 6], torch.randn(5, 3), torch.randn(6, 3).double())
    bad = col.clone()
    bad[0] = 6
    with pytest.raises(RuntimeError, match="column index is out of range for a matrix with 6 columns"):
        ops.csr_sddmm(crow, bad, [5, 6], torch.randn(5, 3), torch.randn(6, 3))


# The AVX-512 SDDMM follows the pattern's slice plan from a density of 1/12 on (int32 row
# pointers, sorted columns, contiguous index tensors): rows not a multiple of the 64-row chunks,
# columns of several 128-column slices and a cut one, tokens of several 64-token panels and a cut
# one, segments of 1-128 entries (dense rows: 8 sums of 16) and lengths that are no multiple of 16.
PLAN_SHAPES = [(200, 300, 0.3, 130), (64, 256, 0.5, 64), (77, 1000, 0.12, 33), (130, 768, 1.0, 200)]


@pytest.mark.skipif("avx512" not in pysparse._C.cpu_isa_supported(), reason="the plan's SDDMM is AVX-512")
@pytest.mark.parametrize("M,K,density,n", PLAN_SHAPES)
@pytest.mark.parametrize("cols", [torch.int16, torch.int32])
def test_sddmm_plan_matches_reference_and_row_kernel(M, K, density, n, cols):
    W = random_sparse(M, K, density, torch.float32, gen(M + K))
    S = W.to_sparse_csr()
    crow, col = S.crow_indices().to(torch.int32), S.col_indices().to(cols)
    a, b = randn(n, M, g=gen(1)).t(), randn(n, K, g=gen(2)).t()  # token-major, as the backward passes them
    made = pysparse._C.csr_plans_made()
    out = ops.csr_sddmm(crow, col, [M, K], a, b)
    assert pysparse._C.csr_plans_made() == made + 1, "the plan was not taken"
    mask = W != 0
    assert_close(out, (a.double() @ b.double().t())[mask], (a.double().abs() @ b.double().abs().t())[mask],
                 torch.float32, what="plan sddmm")
    old = pysparse._C.set_csr_plan(False)
    try:
        row = ops.csr_sddmm(crow, col, [M, K], a, b)
    finally:
        pysparse._C.set_csr_plan(old)
    torch.testing.assert_close(out, row, rtol=1e-5, atol=1e-4)
    with num_threads(1):  # tasks cut at other chunks
        torch.testing.assert_close(ops.csr_sddmm(crow, col, [M, K], a, b), out, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif("avx512" not in pysparse._C.cpu_isa_supported(), reason="the plan's SDDMM is AVX-512")
def test_sddmm_without_a_plan_still_checks_its_pattern():
    """Unsorted columns have no plan: the row kernel serves them; a bad column is still an error."""
    W = random_sparse(100, 300, 0.3, torch.float32, gen(3))
    S = W.to_sparse_csr()
    crow, col = S.crow_indices().to(torch.int32), S.col_indices().to(torch.int32)
    a, b = randn(100, 70, g=gen(4)), randn(300, 70, g=gen(5))
    r = int((crow[1:] - crow[:-1]).argmax())
    j0, j1 = int(crow[r]), int(crow[r + 1])
    swapped = col.clone()
    swapped[j0], swapped[j0 + 1] = col[j0 + 1], col[j0]
    made = pysparse._C.csr_plans_made()
    out = ops.csr_sddmm(crow, swapped, [100, 300], a, b)
    assert pysparse._C.csr_plans_made() == made
    ref = (a @ b.t())[crow.new_tensor(range(100)).repeat_interleave(crow[1:] - crow[:-1]).long(), swapped.long()]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    bad = col.clone()
    bad[j1 - 1] = 300
    with pytest.raises(RuntimeError, match="column index is out of range for a matrix with 300 columns"):
        ops.csr_sddmm(crow, bad, [100, 300], a, b)


# csr_transpose_values: A^T's values, the input gradients' operand

@pytest.mark.parametrize("M,K,density", [(1, 1, 1.0), (7, 33, 0.3), (300, 200, 0.5), (64, 40000, 0.02)])
def test_transpose_values_is_the_permutation(dtype, M, K, density):
    W = random_sparse(M, K, density, dtype, gen(M * K))
    A = CSR.from_dense(W)
    crow, col, vals = A.crow_indices, A.col_indices, A.values
    perm = transpose(crow, col, M, K)[2]
    order = pysparse.autograd.transpose_order(crow, col, M, K)
    assert order.dtype == torch.int32 and order.shape == (2, vals.numel())
    out = ops.csr_transpose_values(vals, order)
    assert torch.equal(out, vals[perm.long()])
    assert torch.equal(pysparse.autograd.transposed_values(crow, col, vals, M, K), out)
    crow_t, col_t, _ = transpose(crow, col, M, K)  # and it is A^T's CSR values
    At = torch.sparse_csr_tensor(crow_t.long(), col_t.long(), out, (K, M)).to_dense()
    assert torch.equal(At, W.t())


def test_transpose_values_bad_input():
    vals = torch.randn(6)
    good = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]], dtype=torch.int32)
    assert torch.equal(ops.csr_transpose_values(vals, good), vals.flip(0))
    for bad, msg in [(torch.tensor([[0, 1, 2, 3, 4, 6], [5, 4, 3, 2, 1, 0]], dtype=torch.int32), "outside"),
                     (torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, -1]], dtype=torch.int32), "outside"),
                     (good.long(), "order must be int32"), (good[:1], "must have 2 rows"),
                     (good.reshape(-1), "must be 2-D")]:
        with pytest.raises((RuntimeError, TypeError), match=msg):
            ops.csr_transpose_values(vals, bad)
    with pytest.raises(TypeError, match="values must be float32, bfloat16 or float16"):
        ops.csr_transpose_values(vals.double(), good)
    twice = torch.tensor([[0, 0], [1, 1]], dtype=torch.int32)  # position 1 never named: 0, not memory
    assert torch.equal(ops.csr_transpose_values(vals, twice), torch.stack([vals[1], torch.tensor(0.0)]))


# ---------------------------------------------------------------------------------------------
# Gradients against the dense fp64 computation on the same zeros

def _grads_linear(W, A, x, b, g):
    vals = A.values.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = ops.csr_linear(x, A.crow_indices, A.col_indices, vals, list(A.shape), b)
    y.backward(g)
    return x.grad, vals.grad, None if b is None else b.grad


@pytest.mark.parametrize("M,K,xshape", [(7, 33, (5,)), (40, 70, (2, 9)), (1, 1, (1,)), (65, 130, (3, 17))])
@pytest.mark.parametrize("index_dtype", CSR_INDEX_DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_gradients(isa, dtype, M, K, xshape, index_dtype, bias):
    W, A = _operand(M, K, 0.3, dtype, M * K, index_dtype)
    x = randn(*xshape, K, dtype=dtype, g=gen(3))
    b = randn(M, dtype=dtype, g=gen(4)) if bias else None
    g = randn(*xshape, M, dtype=dtype, g=gen(5))
    dx, dv, db = _grads_linear(W, A, x, b, g)
    mask = W != 0
    g2, x2 = g.double().reshape(-1, M), x.double().reshape(-1, K)
    assert_close(dx, (g2 @ W.double()).reshape(x.shape), (g2.abs() @ W.double().abs()).reshape(x.shape), dtype,
                 what="dx")
    assert_close(dv, (g2.t() @ x2)[mask], (g2.abs().t() @ x2.abs())[mask], dtype, what="dvalues")
    if bias:
        assert_close(db, g2.sum(0), g2.abs().sum(0), dtype, what="dbias")


@pytest.mark.parametrize("dshape", [(33, 5), (2, 33, 9), (1, 33, 1)])
def test_spmm_gradients(isa, dtype, dshape):
    M, K = 40, 33
    W, A = _operand(M, K, 0.3, dtype, 7)
    X = randn(*dshape, dtype=dtype, g=gen(8)).requires_grad_()
    vals = A.values.detach().clone().requires_grad_()
    Y = ops.csr_spmm(A.crow_indices, A.col_indices, vals, [M, K], X)
    G = randn(*Y.shape, dtype=dtype, g=gen(9))
    Y.backward(G)
    Wd, Gd, Xd = W.double(), G.double(), X.detach().double()
    assert_close(X.grad, Wd.t() @ Gd, Wd.t().abs() @ Gd.abs(), dtype, what="dX")
    mask = W != 0
    dW = (Gd @ Xd.transpose(-1, -2)).reshape(-1, M, K).sum(0)
    dWabs = (Gd.abs() @ Xd.abs().transpose(-1, -2)).reshape(-1, M, K).sum(0)
    assert_close(vals.grad, dW[mask], dWabs[mask], dtype, what="dvalues")


def test_only_requested_gradients_are_computed():
    W, A = _operand(20, 30, 0.3, torch.float32, 1)
    x = torch.randn(4, 30, requires_grad=True)
    y = ops.csr_linear(x, A.crow_indices, A.col_indices, A.values, [20, 30], None)  # values: no grad
    y.sum().backward()
    assert x.grad is not None and A.values.grad is None


def test_values_modified_in_place_between_forward_and_backward():
    W, A = _operand(20, 30, 0.3, torch.float32, 1)
    vals = A.values.clone().requires_grad_()
    x = torch.randn(4, 30, requires_grad=True)
    y = ops.csr_linear(x, A.crow_indices, A.col_indices, vals * 1.0, [20, 30], None)
    v2 = vals * 1.0
    y2 = ops.csr_linear(x, A.crow_indices, A.col_indices, v2, [20, 30], None)
    with torch.no_grad():
        v2.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y2.sum().backward()
    y.sum().backward()  # the untouched graph still runs


def test_threads_do_not_change_gradients():
    W, A = _operand(300, 200, 0.1, torch.float32, 2)
    x, g = torch.randn(64, 200), torch.randn(64, 300)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads_linear(W, A, x, None, g)
        torch.set_num_threads(max(2, prev))
        many = _grads_linear(W, A, x, None, g)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_opcheck_with_gradients():
    W, A = _operand(24, 40, 0.3, torch.float32, 3)
    vals = A.values.clone().requires_grad_()
    x = torch.randn(3, 40, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    torch.library.opcheck(ops.csr_linear.default, (x, A.crow_indices, A.col_indices, vals, [24, 40], b))
    X = torch.randn(40, 7, requires_grad=True)
    torch.library.opcheck(ops.csr_spmm.default, (A.crow_indices, A.col_indices, vals, [24, 40], X))
    torch.library.opcheck(ops.csr_sddmm.default, (A.crow_indices, A.col_indices, [24, 40], torch.randn(24, 5),
                                                  torch.randn(40, 5)))


# ---------------------------------------------------------------------------------------------
# The cached transpose

def test_transpose_is_cached_and_follows_in_place_writes():
    W, A = _operand(30, 50, 0.2, torch.float32, 4)
    crow, col = A.crow_indices.clone(), A.col_indices.clone()
    t1 = transpose(crow, col, 30, 50)
    assert transpose(crow, col, 30, 50) is t1
    crow_t, col_t, perm = t1
    At = CSR(crow_t, col_t, A.values[perm], (50, 30))
    torch.testing.assert_close(At.to_dense(), W.t())
    # a pattern edited in place (here: the first nonzero moved one column right, if that is free)
    r = int(torch.nonzero(crow.diff())[0, 0])
    j = int(crow[r])
    if (j + 1 == int(crow[r + 1]) or int(col[j + 1]) > int(col[j]) + 1) and int(col[j]) + 1 < 50:
        col[j] += 1
        t2 = transpose(crow, col, 30, 50)
        assert t2 is not t1
        W2 = torch.zeros(30, 50).index_put_((torch.repeat_interleave(torch.arange(30), crow.diff().long()),
                                             col.long()), A.values)
        torch.testing.assert_close(CSR(t2[0], t2[1], A.values[t2[2]], (50, 30)).to_dense(), W2.t())


def test_transpose_index_dtypes():
    for index_dtype, want in ((None, torch.int16), (torch.int32, torch.int32), (torch.int64, torch.int64)):
        W, A = _operand(40, 60, 0.3, torch.float32, 5, index_dtype)
        crow_t, col_t, _ = transpose(A.crow_indices, A.col_indices, 40, 60)
        assert col_t.dtype == want and crow_t.dtype == A.crow_indices.dtype


# ---------------------------------------------------------------------------------------------
# SparseLinear trains

def test_sparse_linear_values_are_a_parameter_and_state_dict_round_trips():
    lin = torch.nn.Linear(30, 20)
    sl = pysparse.nn.SparseLinear.from_linear(lin, "csr", sparsity=0.8)
    names = dict(sl.named_parameters())
    assert set(names) == {"weight_values", "bias"}
    assert "weight_col_indices" in dict(sl.named_buffers())
    sl2 = pysparse.nn.SparseLinear.from_state_dict(sl.state_dict())
    assert isinstance(sl2.weight_values, torch.nn.Parameter)
    torch.testing.assert_close(sl2(torch.randn(3, 30, generator=gen(0))), sl(torch.randn(3, 30, generator=gen(0))))
    # BSR / N:M values train too; int8 N:M values (CUTLASS interop) stay a buffer
    for fmt in ("bsr", "nm"):
        sl = pysparse.nn.SparseLinear.from_linear(torch.nn.Linear(32, 16), fmt, blocksize=(8, 8))
        assert set(dict(sl.named_parameters())) == {"weight_values", "bias"}
    w8 = pysparse.SparseNM.from_dense(torch.randint(-3, 4, (16, 32), dtype=torch.int8), 2, 4, prune=True)
    assert "weight_values" in dict(pysparse.nn.SparseLinear(w8).named_buffers())


def _mlp(sparse: bool, train_kernel: str = "sparse"):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))
    if not sparse:
        return net
    for i in (0, 2):
        net[i] = pysparse.nn.SparseLinear.from_linear(net[i], "csr", sparsity=0.8)
        net[i].train_kernel = train_kernel
    return net


@pytest.mark.parametrize("train_kernel", ["sparse", "dense"])
def test_sparse_mlp_trains_like_the_masked_dense_one(train_kernel):
    """200 Adam steps on a synthetic regression: the CSR model (its sparse backward, or its
    dense fall-back) and the dense model with the same masks re-applied after every step reach
    the same loss (within 2%)."""
    g = gen(11)
    X = torch.randn(512, 32, generator=g)
    y = (X[:, :4].sin().sum(1, keepdim=True) + 0.1 * torch.randn(512, 1, generator=g))
    sparse = _mlp(True, train_kernel)
    dense = _mlp(False)
    masks = []
    for i in (0, 2):  # the dense model starts from the sparse model's (pruned) weights
        with torch.no_grad():
            dense[i].weight.copy_(sparse[i].weight.to_dense())
            dense[i].bias.copy_(sparse[i].bias)
        masks.append((dense[i].weight, dense[i].weight != 0))
    losses = train_losses({"sparse": sparse, "dense": dense}, X, y, masks, steps=200, lr=1e-2)
    with torch.no_grad():
        untrained = float(torch.nn.functional.mse_loss(_mlp(True)(X), y))
    assert losses["sparse"] < 0.5 * untrained  # it learned
    assert abs(losses["sparse"] - losses["dense"]) <= 0.02 * losses["dense"], losses
    # the pattern did not move: the zeros of the first layer are where they were
    assert torch.equal(sparse[0].weight.to_dense() != 0, masks[0][1])


@pytest.mark.compile
def test_compile_forward_and_backward():
    sl = pysparse.nn.SparseLinear.from_linear(torch.nn.Linear(40, 24), "csr", sparsity=0.7)
    sl.train_kernel = "sparse"
    x = torch.randn(5, 40, requires_grad=True)

    def step(x):
        return sl(x).square().sum()

    eager = step(x)
    eager.backward()
    ref = (x.grad.clone(), sl.weight_values.grad.clone(), sl.bias.grad.clone())
    x.grad = None
    sl.zero_grad()
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x)
    out.backward()
    torch.testing.assert_close(out, eager)
    for a, b in zip((x.grad, sl.weight_values.grad, sl.bias.grad), ref):
        torch.testing.assert_close(a, b)


def test_train_kernel_dense_fallback_and_auto(tmp_path, monkeypatch):
    """"dense" gives the sparse backward's gradients (values at the stored positions only);
    "auto" times both once per token bucket and remembers; inference always runs the sparse op;
    a bad name is refused."""
    monkeypatch.setenv("PYSPARSE_CACHE_DIR", str(tmp_path))
    sl = pysparse.nn.SparseLinear.from_linear(torch.nn.Linear(50, 30), "csr", sparsity=0.75)
    x = torch.randn(6, 50, generator=gen(1))
    grads = {}
    for kernel in ("sparse", "dense"):
        sl.train_kernel = kernel
        sl.zero_grad()
        xi = x.clone().requires_grad_()
        sl(xi).square().sum().backward()
        grads[kernel] = (xi.grad, sl.weight_values.grad.clone(), sl.bias.grad.clone())
    for a, b in zip(*grads.values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grads["dense"][1].shape == sl.weight_values.shape
    sl.train_kernel = "auto"
    sl(x.requires_grad_())
    assert set(sl._train_choice) == {8} and sl._train_choice[8] in ("sparse", "dense")
    with torch.no_grad():  # inference: the sparse op, whatever was chosen for training
        torch.testing.assert_close(sl(x), sl.to_linear()(x), rtol=1e-5, atol=1e-5)
    sl.eval()  # eval mode with grad enabled (inference without no_grad): the sparse op, no timing
    sl._train_choice.clear()
    sl(torch.randn(40, 50))
    assert sl._train_choice == {}
    lin = torch.nn.Linear(8, 4).eval()
    assert not pysparse.nn.SparseLinear.from_linear(lin, "csr", sparsity=0.5).training
    with pytest.raises(ValueError, match="train_kernel must be one of"):
        sl.train_kernel = "fast"
