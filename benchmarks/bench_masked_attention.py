"""Block-sparse masked attention on CPU: pysparse's masked_attention against SDPA (unmasked and
masked), FlexAttention (torch.compile) and the naive three-op attention, side by side in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_masked_attention.py            # full sweep (~2 min)
    PYTHONPATH=. .venv/bin/python benchmarks/bench_masked_attention.py --quick    # one shape, no flex

fp32, q, k, v (B, H, L, D) standard normal, scale 1/sqrt(D), one mask per row broadcast over batch
and heads. Masks: none; causal; sliding256 (i - 256 < j <= i); local_global (|i - j| <= w, plus the
first g tokens attend to everything and everything attends to them); random97 (tiles of the
local_global block size active at random, every element of an active tile allowed). ours builds
a pysparse.BlockMask (band constructors at the default 64 x 64 for causal / sliding256,
from_dense_mask at the chosen block size for the other two); flex gets create_block_mask with the
same mask_mod semantics and the same BLOCK_SIZE (random97 / local_global index a captured bool
tensor); sdpa_mask gets is_causal=True for causal and the bool mask otherwise; naive is
softmax(q @ k^T * scale + additive -inf mask) @ v. Mask construction is not timed.

local_global block size rule: over b in {64, 32, 16}, band half-width w in {8, 16, ..., 256}
(w < L / 2) and g in {8, 16, 32, 64} global tokens (g <= L / 8), take the largest b for which some
(w, g) gets the block sparsity (fraction of skipped b x b tiles) within 1 point of 90% (bigger
tiles run faster), and the (w, g) closest to 90% with it; when no candidate is within 1 point, the
closest overall. Ties go to the larger b, then the larger w, then the smaller g. A symmetric band needs >= 3 tiles per block row, so a shape reaches
90% only with >= ~48 block rows: L = 128 gets ~47% and L = 512 ~85% at best (reported as such).
random97: tiles active with probability p, then one random key tile added to every block row left
empty (so no query row is empty); p is chosen so that the expected active fraction with the
fill-ins is 3% (p = 0, i.e. exactly one tile per block row, where that alone exceeds 3%).

Every method is first checked against the naive fp32 reference (max abs diff < 1e-4 on rows with
at least one allowed key). Every time is the median of torch.utils.benchmark.Timer.blocked_autorange
with num_threads = torch.get_num_threads() (the Timer's default is one thread). flex: each
(shape, mask) starts from torch._dynamo.reset() and a fresh torch.compile(flex_attention); its first
call, run with inductor's caches disabled (a cold compile + one run), is flex_compile_s, the steady
state is flex_ms. gflop_per_s_ours counts 4 * B * H * L * L * D * (1 - element sparsity of the mask) useful
FLOPs (element sparsity: fraction of disallowed (query, key) pairs). x_vs_*: that method's time /
ours. Results: CSV and markdown under benchmarks/results/<host>/masked_attention.{csv,md}; the bars
of the masked-attention issue are checked at the end.
"""
from __future__ import annotations

import argparse
import csv
import math
import socket
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import pysparse
from pysparse.bench import median_us

MASKS = ("none", "causal", "sliding256", "local_global", "random97")
TOL = 1e-4


def block_sparsity(mask, b):
    return pysparse.BlockMask.from_dense_mask(mask, (b, b)).sparsity


def local_global_mask(L, w, g):
    i = torch.arange(L)
    return ((i[:, None] - i[None, :]).abs() <= w) | (i[:, None] < g) | (i[None, :] < g)


def pick_local_global(L, target=0.9):
    """(b, w, g, mask, block sparsity) by the rule of the module docstring."""
    best = None
    for b in (64, 32, 16):
        for w in (8, 16, 32, 64, 128, 256):
            if w >= L // 2:
                continue
            for g in (8, 16, 32, 64):
                if g > L // 8:
                    continue
                m = local_global_mask(L, w, g)
                s = block_sparsity(m, b)
                d = round(abs(s - target), 6)
                key = (d > 0.01, -b if d <= 0.01 else 0, d, -b, -w, g)
                if best is None or key < best[0]:
                    best = (key, b, w, g, m, s)
    return best[1:]


def random_tile_mask(L, b, target_active=0.03, seed=0):
    nb = -(-L // b)
    f = lambda p: p + (1 - p) ** nb / nb  # noqa: E731  expected active fraction with fill-ins
    if f(0.0) >= target_active:
        p = 0.0
    else:
        lo, hi = 0.0, target_active
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target_active else (lo, mid)
        p = lo
    gen = torch.Generator().manual_seed(seed)
    tiles = torch.rand(nb, nb, generator=gen) < p
    empty = ~tiles.any(1)
    fill = torch.randint(0, nb, (nb,), generator=gen)
    tiles[empty.nonzero().flatten(), fill[empty]] = True
    mask = tiles.repeat_interleave(b, 0).repeat_interleave(b, 1)[:L, :L].contiguous()
    return p, mask


def build_case(name, L):
    """dict(mask: bool (L, L) or None, bm: BlockMask or None, causal flag, block size, flex mask_mod, note)."""
    i = torch.arange(L)
    if name == "none":
        return dict(mask=None, bm=None, is_causal=False, b=64, mod=None, note="")
    if name == "causal":
        return dict(mask=i[:, None] >= i[None, :], bm=None, is_causal=True, b=64,
                    mod=lambda b, h, q, k: q >= k, note="")
    if name == "sliding256":
        return dict(mask=(i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 256),
                    bm=pysparse.BlockMask.sliding_window(L, 256, causal=True, block_size=(64, 64)), is_causal=False, b=64,
                    mod=lambda b, h, q, k: (q >= k) & (q - k < 256), note="")
    b, w, g, m, _ = pick_local_global(L)
    if name == "local_global":
        note = f"w={w} g={g}"
    else:
        p, m = random_tile_mask(L, b)
        note = f"p={p:.4f}"
    return dict(mask=m, bm=pysparse.BlockMask.from_dense_mask(m, (b, b)), is_causal=False, b=b,
                mod=lambda bb, h, q, k: m[q, k], note=note)


def naive(q, k, v, add, scale):
    s = q @ k.transpose(-1, -2) * scale
    if add is not None:
        s = s + add
    return torch.softmax(s, -1) @ v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", default="8x12x512x64,1x32x2048x128,32x12x128x64")
    ap.add_argument("--masks", default=",".join(MASKS))
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--min-run-time", type=float, default=0.3)
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.no_flex, args.min_run_time = "8x12x512x64", True, 0.1
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    masks = args.masks.split(",")
    out_dir = Path(__file__).parent / "results" / socket.gethostname()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "masked_attention_quick" if args.quick else "masked_attention"
    info = pysparse.info()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, pysparse ISA {info['cpu_isa_selected']}", flush=True)
    if not args.no_flex:
        from torch._inductor import config as inductor_config
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rows, notes = [], []
    t_start = time.time()
    for B, H, L, D in shapes:
        shape = f"{B}x{H}x{L}x{D}"
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
        scale = 1.0 / math.sqrt(D)
        for name in masks:
            c = build_case(name, L)
            mask, bm, b = c["mask"], c["bm"], c["b"]
            add = None if mask is None else torch.zeros(L, L).masked_fill_(~mask, float("-inf"))[None, None]
            ref = naive(q, k, v, add, scale)
            rows_ok = torch.ones(L, dtype=torch.bool) if mask is None else mask.any(1)
            elem_sparsity = 0.0 if mask is None else 1.0 - mask.float().mean().item()
            if name == "causal":
                bsp = pysparse.BlockMask.causal(L, block_size=(b, b)).sparsity
            else:
                bsp = 0.0 if bm is None else bm.sparsity

            f_ours = lambda: pysparse.masked_attention(q, k, v, block_mask=bm, is_causal=c["is_causal"])  # noqa: E731
            f_dense = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
            if name == "causal":
                f_smask = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            elif mask is None:
                f_smask = f_dense
            else:
                smask = mask[None, None]
                f_smask = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=smask)  # noqa: E731
            f_naive = lambda: naive(q, k, v, add, scale)  # noqa: E731

            def check(what, out):
                err = (out[:, :, rows_ok] - ref[:, :, rows_ok]).abs().max().item()
                if not err < TOL:
                    raise AssertionError(f"{shape} {name}: {what} differs from the naive reference by {err:.3g}")
                return err

            errs = {m: check(m, f()) for m, f in (("ours", f_ours), ("sdpa_mask", f_smask))}  # sdpa_dense: unmasked

            t_flex, t_comp = None, None
            if not args.no_flex:
                try:
                    torch._dynamo.reset()
                    flex = torch.compile(flex_attention)
                    fbm = None if c["mod"] is None else create_block_mask(c["mod"], 1, 1, L, L, device="cpu", BLOCK_SIZE=b)
                    with inductor_config.patch(force_disable_caches=True):  # a cold compile
                        t0 = time.perf_counter()
                        out = flex(q, k, v, block_mask=fbm, scale=scale)
                        t_comp = time.perf_counter() - t0
                    errs["flex"] = check("flex", out)
                    t_flex = median_us(lambda: flex(q, k, v, block_mask=fbm, scale=scale), args.min_run_time)
                except Exception as e:  # noqa: BLE001  unsupported on CPU, wrong result, ...
                    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                    notes.append(f"flex {shape} {name}: n/a ({type(e).__name__}: {reason})")
                    print(notes[-1], flush=True)
                    t_flex = None

            t_ours = median_us(f_ours, args.min_run_time)
            t_dense = median_us(f_dense, args.min_run_time)
            t_smask = t_dense if f_smask is f_dense else median_us(f_smask, args.min_run_time)
            t_naive = median_us(f_naive, args.min_run_time)
            del ref

            ms = lambda us: round(us / 1e3, 3)  # noqa: E731
            row = dict(shape=shape, mask=name, block_size=f"{b}x{b}", block_sparsity=round(bsp, 4),
                       ours_ms=ms(t_ours), sdpa_dense_ms=ms(t_dense), sdpa_mask_ms=ms(t_smask),
                       flex_ms=ms(t_flex) if t_flex else "n/a", flex_compile_s=round(t_comp, 1) if t_flex else "n/a",
                       naive_ms=ms(t_naive), x_vs_sdpa_mask=round(t_smask / t_ours, 2),
                       x_vs_sdpa_dense=round(t_dense / t_ours, 2),
                       x_vs_flex=round(t_flex / t_ours, 2) if t_flex else "n/a",
                       gflop_per_s_ours=round(4 * B * H * L * L * D * (1 - elem_sparsity) / t_ours / 1e3, 1))
            rows.append(row)
            if c["note"]:
                notes.append(f"{shape} {name}: block {b}x{b}, {c['note']}, block sparsity {bsp:.4f}, "
                             f"element sparsity {elem_sparsity:.4f}")
            print(f"{shape} {name:12s} [{b}x{b}, block sparsity {bsp:.3f}]: ours {row['ours_ms']} ms | sdpa dense "
                  f"{row['sdpa_dense_ms']} | sdpa mask {row['sdpa_mask_ms']} | flex {row['flex_ms']} "
                  f"(first call {row['flex_compile_s']} s) | naive {row['naive_ms']} | {row['x_vs_sdpa_mask']}x sdpa mask, "
                  f"{row['x_vs_flex']}{'x' if t_flex else ''} flex | max err " + ", ".join(f"{m} {e:.1e}" for m, e in errs.items()), flush=True)

    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    def find(shape, mask):
        return next((r for r in rows if r["shape"] == shape and r["mask"] == mask), None)

    bars = []
    for B, H, L, D in shapes:
        s = f"{B}x{H}x{L}x{D}"
        r = find(s, "local_global")
        if r:
            bars.append((f"local_global (block sparsity {r['block_sparsity']:.2f}): >= 4x sdpa_mask", s, r["x_vs_sdpa_mask"], 4.0))
        r = find(s, "causal")
        if r:
            bars.append(("causal: >= 1.4x SDPA causal", s, r["x_vs_sdpa_mask"], 1.4))
        r = find(s, "none")
        if r:
            bars.append(("none: >= 0.7x SDPA (sdpa / ours)", s, r["x_vs_sdpa_dense"], 0.7))
        flexed = [r for r in rows if r["shape"] == s and r["x_vs_flex"] != "n/a"]
        if flexed:
            worst = min(flexed, key=lambda r: r["x_vs_flex"])
            bars.append((f"every mask: faster than flex (worst: {worst['mask']})", s, worst["x_vs_flex"], 1.0))

    def verdict(v, t, strict):
        return "PASS" if (v > t if strict else v >= t) else "MISS"

    lines = [f"# Masked attention (CPU, fp32), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{time.time() - t_start:.0f} s", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, pysparse CPU ISA {info['cpu_isa_selected']}", "",
             "| bar | shape | measured | target | result |", "|---|---|---:|---:|---|"]
    lines += [f"| {b} | {s} | {v} | {'> ' + str(t) if b.startswith('every') else t} | "
              f"{verdict(v, t, b.startswith('every'))} |" for b, s, v, t in bars]
    lines += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:6 + len(bars)]))


if __name__ == "__main__":
    main()
