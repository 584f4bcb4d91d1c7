"""Smoke test of an installed pysparse (run from outside the source tree): every op family on
CPU against dense torch."""
import torch
import torch.nn.functional as F

import pysparse

assert "site-packages" in pysparse.__file__, pysparse.__file__
torch.manual_seed(0)
W = pysparse.prune.magnitude(torch.randn(256, 128), 0.9)
x = torch.randn(7, 128)
for A in (pysparse.CSR.from_dense(W), pysparse.BSR.from_dense(W, blocksize=(16, 16))):
    torch.testing.assert_close(pysparse.linear(x, A), x @ W.T, rtol=1e-4, atol=1e-4)
W24 = pysparse.prune.nm(torch.randn(256, 128), 2, 4)
torch.testing.assert_close(pysparse.linear(x, pysparse.Sparse24.from_dense(W24), activation="gelu"),
                           F.gelu(x @ W24.T), rtol=1e-4, atol=1e-4)
q, k, v = (torch.randn(2, 4, 70, 32) for _ in range(3))
torch.testing.assert_close(pysparse.masked_attention(q, k, v, is_causal=True),
                           F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-4, atol=1e-4)
w1, w2 = torch.randn(64, 32), torch.randn(32, 64)
torch.testing.assert_close(pysparse.pruned_ffn(torch.randn(3, 32).clone(), w1, None, w2, None, activation="relu").shape,
                           torch.Size([3, 32]))
info = pysparse.info()
print("smoke ok:", pysparse.__version__, "torch", info["torch_runtime"], "isa", info["cpu_isa_selected"])
