"""Layer by layer: prune real-sized transformer layer weights and time them.

For each layer shape of BERT-base and LLaMA-7B, prune a random weight to 90% (unstructured ->
CSR, and 32x32 blocks -> BSR) and time y = x @ W.T at decode (1 token) and batch (128 tokens)
sizes: pysparse vs dense F.linear vs torch.sparse, side by side in one run, 2 threads, fp32.
"""
import time
import warnings

import torch
import torch.nn.functional as F

from . import prune
from ._info import info
from .bench import median_us
from .formats import BSR, CSR
from .ops import linear

LAYERS = {
    "BERT-base": [("attn q/k/v/o", 768, 768), ("ffn up", 3072, 768), ("ffn down", 768, 3072)],
    "LLaMA-7B": [("attn q/k/v/o", 4096, 4096), ("mlp gate/up", 11008, 4096), ("mlp down", 4096, 11008)],
}


def run(quick: bool = False) -> None:
    torch.manual_seed(0)
    about = info()
    print(f"pysparse {about['pysparse']} | torch {about['torch_runtime']} | CPU kernels: "
          f"{about['cpu_isa_selected']} | threads: {about['threads']}\n")
    header = ("| model | layer | W (out x in) | pattern | tokens | dense us | torch.sparse us "
              "| pysparse us | vs dense | vs torch.sparse |")
    print(header)
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    t0 = time.time()
    for model, layers in LAYERS.items():
        if quick and model != "BERT-base":
            continue
        for name, out_f, in_f in layers:
            W0 = torch.randn(out_f, in_f) / in_f ** 0.5
            b = torch.randn(out_f) * 0.01
            for pattern in ("90% unstructured", "90% 32x32 blocks"):
                if pattern.endswith("unstructured"):
                    W = prune.magnitude(W0, 0.9)
                    A = CSR.from_dense(W)
                else:
                    W = prune.blocks(W0, 0.9, (32, 32))
                    A = BSR.from_dense(W, (32, 32))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    St = A.to_torch()
                for tokens in (1, 128):
                    x = torch.randn(tokens, in_f)
                    ref = F.linear(x, W, b)
                    got = linear(x, A, b)
                    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
                    xt = x.t().contiguous()
                    t_dense = median_us(lambda: F.linear(x, W, b), 0.2)
                    t_ts = median_us(lambda: torch.addmm(b[:, None], St, xt).t(), 0.2)
                    t_ours = median_us(lambda: linear(x, A, b), 0.2)
                    print(f"| {model} | {name} | {out_f}x{in_f} | {pattern} | {tokens} | {t_dense:.0f} "
                          f"| {t_ts:.0f} | {t_ours:.0f} | {t_dense / t_ours:.2f}x | {t_ts / t_ours:.2f}x |",
                          flush=True)
    print(f"\nmedians of torch.utils.benchmark blocked_autorange; torch.sparse is addmm(bias, W_sparse, x.T)"
          f" in its own {{CSR,BSR}} layout with int32 indices; {time.time() - t0:.0f} s in all.")
