"""The fuzz suite: hypothesis-generated inputs for the formats, the raw ops and file headers, each
run in a child process (tests/fuzz_worker.py), so that a crash fails the case that caused it.

The contract checked on every input (the README's "What pysparse guarantees on bad input"):
never a crash (a signal, an abort); a valid input gives the reference's answer; anything else is
a ValueError or TypeError, or a RuntimeError carrying one of pysparse's own sentences
("pysparse: ..."), with a message. Huge declared shapes over stride-0 operands, extreme band
bounds and block sizes, malformed indices, masks and files are all in the generators.

`make test` runs a fixed sample (derandomized; about half a minute); `make fuzz` runs many more,
newly random examples (PYSPARSE_FUZZ_EXAMPLES, default 3000 per generator there).
"""
from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.environ.get("PYSPARSE_FUZZ_EXAMPLES")
settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz", derandomize=False, deadline=None, database=None, print_blob=True,
                          max_examples=int(FUZZ or 0) or 100, suppress_health_check=list(HealthCheck))
PROFILE = "fuzz" if FUZZ else "ci"


def examples(n: int):
    """n examples in CI (sized so the whole suite stays near a minute), the fuzz profile's count
    under `make fuzz`."""
    return settings(settings.get_profile(PROFILE), **({} if FUZZ else {"max_examples": n}))


pytestmark = pytest.mark.fuzz
CASE_TIMEOUT_S = 120


class Worker:
    """One long-lived child process running cases; replaced after it dies."""

    def __init__(self):
        self.proc = None

    def _start(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fuzz_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)

    def run(self, case: str, args: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps({"case": case, "args": args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], CASE_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            if not ready:
                self.proc.kill()
            rc = self.proc.wait()
            self.proc = None
            why = f"killed by signal {-rc}" if rc < 0 else (f"exit status {rc}" if ready else f"no answer in {CASE_TIMEOUT_S} s")
            pytest.fail(f"the worker died ({why}) on {case}({args})")
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _acceptable(res: dict) -> bool:
    if res["type"] in ("ValueError", "TypeError"):
        return bool(res["msg"])
    # An allocation that fits the process's limit but not what is left of it (the worker caps its
    # address space) is a resource error, not a defect: sizes beyond the limit itself are
    # ValueErrors (checked_numel).
    if res["type"] == "MemoryError" or "can't allocate memory" in res["msg"] or "not enough memory" in res["msg"]:
        return True
    # our C++ checks (TORCH_CHECK) raise RuntimeError with one of our sentences
    return res["type"] == "RuntimeError" and res["msg"].startswith("pysparse:")


def check(worker, case: str, args: dict, *, valid: bool) -> None:
    """valid: the input is well-formed, so any error is a failure; otherwise an error must be acceptable."""
    res = worker.run(case, args)
    if res["status"] == "wrong":
        pytest.fail(f"{case}({args}): {res['msg']}")
    if res["status"] == "error" and (valid or not _acceptable(res)):
        pytest.fail(f"{case}({args}) raised {res['type']}: {res['msg']}")


ISA = st.sampled_from(["scalar", "avx2", "avx512"])
THREADS = st.sampled_from([1, 2, 3])
DTYPE = st.sampled_from(["f32", "bf16", "f16"])
SEED = st.integers(0, 2 ** 31 - 1)
INT64 = [-2 ** 63, -2 ** 62, -2 ** 31, -1, 0, 1, 2 ** 31, 2 ** 62, 2 ** 63 - 1]


# ---------------------------------------------------------------------------------------------
# Products on valid inputs


@st.composite
def spmm_args(draw):
    fmt = draw(st.sampled_from(["csr", "bsr", "nm"]))
    bh = bw = 1
    nm = (2, 4)
    if fmt == "bsr":
        bh, bw = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 32])), draw(st.sampled_from([1, 2, 3, 4, 8, 16, 32]))
        M, K = bh * draw(st.integers(0, 5)), bw * draw(st.integers(0, 5))
    elif fmt == "nm":
        nm = draw(st.sampled_from([(2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (1, 16), (8, 16)]))
        M, K = draw(st.integers(0, 40)), nm[1] * draw(st.integers(0, 8))
    else:
        M, K = draw(st.integers(0, 70)), draw(st.integers(0, 70))
    layout = draw(st.sampled_from(["linear", "spmm"]))
    return dict(fmt=fmt, M=M, K=K, n=draw(st.sampled_from([0, 1, 2, 3, 5, 8, 9, 16, 17, 33, 64, 65, 130, 300, 1024])),
                batch=draw(st.lists(st.integers(0, 3), max_size=2)), dtype=draw(DTYPE), layout=layout,
                view=draw(st.sampled_from(["contiguous", "sliced", "transposed", "expanded"])),
                bias=draw(st.booleans()), act=draw(st.sampled_from(["none", "relu", "gelu", "silu"])),
                isa=draw(ISA), threads=draw(THREADS), density=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
                bh=bh, bw=bw, nm=nm, seed=draw(SEED),
                index_dtype=draw(st.sampled_from([None, "int16", "int32", "int64"])) if fmt == "csr" else None)



@st.composite
def huge_args(draw):
    return dict(fmt=draw(st.sampled_from(["csr", "bsr", "nm"])),
                M_exp=draw(st.one_of(st.integers(0, 12), st.integers(20, 60))),
                K_exp=draw(st.integers(0, 61)), K_add=draw(st.integers(-2, 2)), tokens=draw(st.integers(1, 3)),
                layout=draw(st.sampled_from(["linear", "spmm"])), nnz=draw(st.integers(0, 6)), seed=draw(SEED))



# ---------------------------------------------------------------------------------------------
# Raw indices and masks


def raw_pattern(draw, rows: int, cols: int, what):
    """A valid (crow, col) pattern of rows x cols with 0-3 entries per row, then broken as `what`
    says: "crow" / "col" (one entry set to anything), "length" (a row pointer added or dropped);
    any other value leaves it valid."""
    counts = draw(st.lists(st.integers(0, 3), min_size=rows, max_size=rows))
    crow = [0]
    for c in counts:
        crow.append(crow[-1] + c)
    col = [draw(st.integers(0, max(cols - 1, 0))) for _ in range(crow[-1])]
    anything = st.one_of(st.integers(-3, 12), st.sampled_from(INT64))
    if what == "crow" and crow:
        crow[draw(st.integers(0, len(crow) - 1))] = draw(anything)
    elif what == "col" and col:
        col[draw(st.integers(0, len(col) - 1))] = draw(anything)
    elif what == "length" or what in ("crow", "col"):  # crow/col with nothing to break: the length
        crow = crow + [crow[-1]] if draw(st.booleans()) else crow[:-1] or [0]
    return crow, col


@st.composite
def raw_compressed_args(draw):
    fmt = draw(st.sampled_from(["csr", "bsr"]))
    bh, bw = (1, 1) if fmt == "csr" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    rows, cols = draw(st.integers(0, 5)), draw(st.integers(0, 6))
    what = draw(st.sampled_from(["crow", "col", "length"])) if draw(st.booleans()) else None  # break something
    crow, col = raw_pattern(draw, rows, cols, what)
    col16 = fmt == "csr" and draw(st.booleans())
    return dict(fmt=fmt, M=rows * bh, K=cols * bw, n=draw(st.sampled_from([1, 3, 8, 17, 40])), crow=crow, col=col,
                bh=bh, bw=bw, layout=draw(st.sampled_from(["linear", "spmm"])), col16=col16, isa=draw(ISA),
                threads=draw(THREADS), seed=draw(SEED))



@st.composite
def sddmm_raw_args(draw):
    """csr_sddmm's pattern as raw_compressed_args breaks it, and operands whose row counts may
    not match the matrix's."""
    rows, cols = draw(st.integers(0, 5)), draw(st.integers(0, 6))
    what = draw(st.sampled_from(["nothing", "nothing", "crow", "col", "length", "a", "b"]))
    crow, col = raw_pattern(draw, rows, cols, what)
    ta, tb = rows, cols
    if what == "a":
        ta = draw(st.integers(0, 7))
    elif what == "b":
        tb = draw(st.integers(0, 7))
    return dict(M=rows, K=cols, crow=crow, col=col, col16=draw(st.booleans()), ta=ta, tb=tb,
                n=draw(st.sampled_from([0, 1, 3, 16, 17, 40])), transposed=draw(st.booleans()), isa=draw(ISA),
                threads=draw(THREADS), seed=draw(SEED))


@st.composite
def transpose_values_raw_args(draw):
    """An order of 0-8 (output, value) positions: half of them a valid one (two permutations), the
    rest any positions in [-2, 10) over 0-8 values."""
    n = draw(st.integers(0, 8))
    if draw(st.booleans()):
        nv = n
        dst = draw(st.permutations(list(range(n))))
        src = draw(st.permutations(list(range(n))))
    else:
        nv = draw(st.integers(0, 8))
        dst = draw(st.lists(st.integers(-2, 9), min_size=n, max_size=n))
        src = draw(st.lists(st.integers(-2, 9), min_size=n, max_size=n))
    return dict(nv=nv, dst=list(dst), src=list(src), dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
                seed=draw(SEED))


@st.composite
def raw_nm_args(draw):
    n, m = draw(st.sampled_from([(2, 4), (1, 4), (2, 8), (4, 16)]))
    R, K = draw(st.integers(0, 5)), m * draw(st.integers(0, 6))
    mb = K // 8 + (K % 8 > 0)
    mask = []
    for _ in range(R):  # a valid row: n bits per group
        bits = []
        for _ in range(K // m):
            keep = draw(st.permutations(range(m)))[:n]
            bits += [int(j in keep) for j in range(m)]
        bits += [0] * (mb * 8 - K)
        mask += [sum(b << i for i, b in enumerate(bits[8 * j:8 * j + 8])) for j in range(mb)]
    if mask and draw(st.booleans()):
        mask[draw(st.integers(0, len(mask) - 1))] = draw(st.integers(0, 255))
    return dict(R=R, K=K, n=n, m=m, mask_bytes=mask, tokens=draw(st.sampled_from([1, 2, 5, 8, 33])), isa=draw(ISA),
                threads=draw(THREADS), seed=draw(SEED))



# ---------------------------------------------------------------------------------------------
# Attention


BLOCK = st.one_of(st.none(), st.sampled_from([1, 3, 16, 64, 2 ** 62]),
                  st.tuples(st.sampled_from([1, 5, 32, 2 ** 40]), st.sampled_from([2, 7, 64, 2 ** 62])))
BOUND = st.one_of(st.integers(-90, 90), st.sampled_from(INT64 + [-2 ** 64, 2 ** 64]))


@st.composite
def attention_args(draw):
    Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    return dict(B=draw(st.integers(1, 2)), H=Hkv * group, Hkv=Hkv, Lq=draw(st.integers(0, 80)),
                Lk=draw(st.integers(0, 80)), D=draw(st.sampled_from([0, 1, 8, 17, 64])),
                Dv=draw(st.sampled_from([1, 8, 17, 64])), dtype=draw(DTYPE), block=draw(BLOCK),
                mask=draw(st.sampled_from(["none", "band", "causal", "sliding", "padding", "band&padding", "dense",
                                           "float"])),
                lo=draw(BOUND), hi=draw(BOUND), window=draw(st.sampled_from([1, 2, 17, 2 ** 62, 2 ** 63 - 1])),
                lengths=draw(st.lists(st.sampled_from([-5, 0, 3, 40, 79, 2 ** 62]), min_size=2, max_size=2)),
                special=draw(st.sampled_from(["none", "none", "q:nan", "k:nan", "k:inf", "k:-inf", "q:inf",
                                              "mask:nan", "mask:inf"])),
                head_mask=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.1, 1.0])), isa=draw(ISA),
                threads=draw(THREADS), seed=draw(SEED))



@st.composite
def blockmask_args(draw):
    return dict(ctor=draw(st.sampled_from(["band", "sliding", "causal", "padding"])), Lq=draw(st.integers(0, 100)),
                Lk=draw(st.integers(0, 100)),
                block=draw(st.one_of(BLOCK, st.sampled_from([0, -1, 2.5, True, [8], "64"]))),
                lo=draw(BOUND), hi=draw(BOUND), window=draw(st.sampled_from([0, 1, 5, 2 ** 62, 2 ** 70])),
                lengths=draw(st.lists(st.sampled_from([-2 ** 62, -1, 0, 7, 64, 99, 2 ** 62]), min_size=1, max_size=3)),
                causal=draw(st.booleans()))



@st.composite
def attention_raw_args(draw):
    Lq, Lk = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    bq, bk = draw(st.sampled_from([1, 7, 16, 64, 2 ** 40, 2 ** 62])), draw(st.sampled_from([1, 5, 16, 2 ** 62]))
    QB, KB = -(-Lq // bq), -(-Lk // bk)
    kinds = draw(st.one_of(st.none(), st.lists(st.one_of(st.integers(0, 2), st.integers(-128, 127)),
                                               min_size=QB * KB, max_size=QB * KB)))
    return dict(Lq=Lq, Lk=Lk, block_q=bq, block_k=bk, kinds=kinds, band_lo=draw(st.sampled_from(INT64[:6]) | st.integers(-50, 50)),
                band_hi=draw(st.sampled_from(INT64[3:]) | st.integers(-50, 50)),
                kv_len=draw(st.one_of(st.none(), st.sampled_from(INT64), st.integers(-3, 45))))



# ---------------------------------------------------------------------------------------------
# Fused FFN, N:M compression, format constructors, files


@st.composite
def ffn_args(draw):
    fmts = st.sampled_from(["dense", "csr", "bsr", "nm"])
    return dict(tokens=draw(st.integers(0, 20)), d=4 * draw(st.integers(0, 8)), hidden=4 * draw(st.integers(0, 12)),
                f1=draw(fmts), f2=draw(fmts), f3=draw(st.sampled_from(["none", "dense", "csr", "nm"])),
                act=draw(st.sampled_from(["none", "relu", "gelu", "gelu_tanh", "silu"])),
                threshold=draw(st.sampled_from([0.0, 0.0, 0.5])), bias=draw(st.booleans()),
                transposed=draw(st.booleans()), dtype=draw(DTYPE), seed=draw(SEED))



ACTIVATION = st.fixed_dictionaries(dict(
    shape=st.lists(st.sampled_from([0, 1, 2, 15, 16, 17, 33, 300]), min_size=1, max_size=3), dtype=DTYPE,
    view=st.sampled_from(["contiguous", "sliced", "transposed", "expanded"]),
    name=st.sampled_from(["gelu_tanh", "gelu_tanh", "none", "relu", "gelu", "silu"]),
    scale=st.sampled_from([1e-4, 1.0, 8.0, 1e4]), special=st.booleans(), isa=ISA, threads=THREADS, seed=SEED))


FFN_RAW = st.fixed_dictionaries(dict(
    tag=st.sampled_from(["nm:2:4", "nm:2:4:junk", "nm:2:4x", "nm:2", "nm:x:y", "nm:-2:4", "nm:2:400000000000", "csr",
                         "bogus", ""]),
    ntensors=st.integers(0, 3), hidden=st.sampled_from([16, 15, 0, -1, 2 ** 62])))


@st.composite
def nm_compress_args(draw):
    n, m = draw(st.sampled_from([(2, 4), (1, 4), (3, 8), (4, 16)]))
    return dict(R=draw(st.integers(0, 20)), K=m * draw(st.integers(0, 8)), n=n, m=m,
                density=draw(st.sampled_from([0.2, 0.5, 0.9])), dtype=draw(DTYPE), seed=draw(SEED))


SIZE = st.sampled_from([0, 2, 4, -1, 2.7, 4.0, True, "4", None, 2 ** 63, 2 ** 70])


CONSTRUCT = st.fixed_dictionaries(dict(
    fmt=st.sampled_from(["csr", "bsr", "nm"]), shape=st.one_of(st.tuples(SIZE, SIZE), st.tuples(SIZE)).map(list),
    crow_dtype=st.sampled_from(["int32", "int64", "float32"]),
    col_dtype=st.sampled_from(["int16", "int32", "int64", "uint8", "float32"]),
    values_dtype=st.sampled_from(["float32", "float64", "int8", "bfloat16"]), nnz=st.integers(0, 2),
    check=st.booleans()))


def _header_file(header, data: bytes, pad: int) -> bytes:
    blob = (json.dumps(header) if not isinstance(header, bytes) else header.decode("latin-1")).encode("latin-1", "replace")
    blob += b" " * pad
    return struct.pack("<Q", len(blob)) + blob + data


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 65, 2 ** 65) | st.floats() | st.text(max_size=4),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                    max_leaves=8)


@st.composite
def safetensors_blobs(draw):
    """Near-valid files (one field of a valid header changed) and arbitrary JSON headers."""
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "__metadata__"]), min_size=0, max_size=3, unique=True))
    header, offset = {}, 0
    for name in names:
        if name == "__metadata__":
            header[name] = {"k": "v"}
            continue
        dtype, size = draw(st.sampled_from([("F32", 4), ("F16", 2), ("BOOL", 1), ("I64", 8), ("U8", 1)]))
        shape = draw(st.lists(st.integers(0, 3), max_size=2))
        n = 1
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n * size]}
        offset += n * size
    data = bytes(draw(st.integers(0, 1)) for _ in range(offset))  # BOOL-safe bytes
    how = draw(st.sampled_from(["valid", "field", "json", "bytes", "length"]))
    if how == "field" and names:
        entry = header[draw(st.sampled_from(names))]
        key = draw(st.sampled_from(sorted(entry)))
        entry[key] = draw(JSON)
    elif how == "json":
        header = draw(JSON)
    blob = _header_file(header, data, draw(st.integers(0, 9)))
    if how == "bytes" and blob:
        i = draw(st.integers(0, len(blob) - 1))
        blob = blob[:i] + bytes([draw(st.integers(0, 255))]) + blob[i + 1:]
    elif how == "length":
        blob = struct.pack("<Q", draw(st.sampled_from([0, 1, 7, 2 ** 32, 2 ** 63]))) + blob[8:]
    return blob.hex()


SAFETENSORS = safetensors_blobs().map(lambda blob: dict(blob_hex=blob, reference=True))


# (case in fuzz_worker.py, its arguments, examples in CI, whether every input is valid: then any
# error fails; otherwise an error must be an acceptable one)
GENERATORS = {
    "spmm": (spmm_args(), 300, True),
    "grad": (spmm_args(), 200, True),
    "sddmm_raw": (sddmm_raw_args(), 300, False),
    "transpose_values_raw": (transpose_values_raw_args(), 200, False),
    "huge": (huge_args(), 200, False),
    "raw_compressed": (raw_compressed_args(), 400, False),
    "raw_nm": (raw_nm_args(), 300, False),
    "attention": (attention_args(), 400, True),
    "blockmask": (blockmask_args(), 300, False),
    "attention_raw": (attention_raw_args(), 300, False),
    "ffn": (ffn_args(), 240, True),
    "ffn_raw": (FFN_RAW, 120, False),
    "nm_compress": (nm_compress_args(), 200, True),
    "activation": (ACTIVATION, 300, True),
    "construct": (CONSTRUCT, 300, False),
    "safetensors_file": (SAFETENSORS, 400, False),
}


@pytest.mark.parametrize("case", sorted(GENERATORS))
def test_fuzz(worker, case):
    strategy, n, valid = GENERATORS[case]

    @examples(n)
    @given(args=strategy)
    def run(args):
        check(worker, case, args, valid=valid)

    run()
