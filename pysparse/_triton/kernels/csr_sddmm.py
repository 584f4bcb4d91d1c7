"""Triton kernel for the CSR SDDMM (the value gradient of the CSR products): out[j] =
<a[row[j], :], b[col[j], :]> for a block of BLOCK_J stored entries per program, the n columns in
chunks of BLOCK_N, accumulated in fp32. row[j] (the row of each stored entry) is expanded from the
row pointers by the launcher."""
import triton
import triton.language as tl


@triton.jit
def csr_sddmm_kernel(row_ptr, col_ptr, a_ptr, b_ptr, out_ptr, nnz, n, stride_a, stride_b,
                     BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    j = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    live = j < nnz
    r = tl.load(row_ptr + j, mask=live, other=0).to(tl.int64)
    c = tl.load(col_ptr + j, mask=live, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for t0 in range(0, n, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        m = live[:, None] & (t[None, :] < n)
        a = tl.load(a_ptr + r[:, None] * stride_a + t[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c[:, None] * stride_b + t[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + j, acc.to(out_ptr.dtype.element_ty), mask=live)
