"""safetensors files read and written with the standard library and torch only (the wheel must
load models without the safetensors package).

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
length N; N bytes of UTF-8 JSON that begin with '{' and may end in space padding,
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}; then the
tensors' little-endian bytes, which must tile the rest of the file exactly. Reading never executes
code (unlike pickle), which is why models are saved this way.

Every file the reference reader (the safetensors package) refuses is refused here, with one
ValueError naming the file and the entry. We are stricter where the spec is and the reference is
not: a repeated key, an entry key other than dtype/shape/data_offsets, a BOOL byte other than 0
or 1, and anything but spaces around the JSON object are refused too; so are F4 tensors and
empty shapes whose strides torch cannot hold (see _DTYPES and _nbytes).
"""
from __future__ import annotations

import collections
import json
import os
import reprlib
import uuid
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch

_MAX_HEADER = 100_000_000  # bytes; the reference reader's limit
_MAX_DIM = 2**63 - 1  # torch sizes are int64
_MAX_U64 = 2**64 - 1
_METADATA = "__metadata__"
_KEYS = ("dtype", "shape", "data_offsets")

# Every dtype the reference maps to torch, where this torch has it. F4 (two values a byte) and
# the F6 types are not read: torch holds F4 with a halved last dimension, which a state_dict
# round trip would not survive.
_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
    ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"),
    ("C64", "complex64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"),
) if hasattr(torch, attr)}
_NAMES = {v: k for k, v in _DTYPES.items()}


class _Object(dict):
    """A JSON object that remembers the keys its text repeats (json keeps only the last one)."""
    repeated: Tuple[str, ...] = ()


def _object(pairs) -> _Object:
    obj = _Object(pairs)
    if len(obj) < len(pairs):
        obj.repeated = tuple(k for k, n in collections.Counter(k for k, _ in pairs).items() if n > 1)
    return obj


class _Constant:
    """NaN, Infinity or -Infinity, which Python's json reads but JSON has not: kept as a value
    that no check accepts, so that the error names the entry it stands in."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _json_int(text: str):
    # serde_json, the reference's parser, reads -0 as the float -0.0, which is no size: so do we.
    return -0.0 if text == "-0" else int(text)


class _Repr(reprlib.Repr):
    """Short reprs for messages: header values may be huge or deeply nested."""
    repr__Object = reprlib.Repr.repr_dict  # reprlib picks the method by type name


_REPR = _Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring = 3, 6, 4, 60


def _is_text(s: str) -> bool:
    """False for strings with lone surrogates: JSON escapes can spell them, UTF-8 cannot."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Entry(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: List[int]
    begin: int
    end: int


def load_file(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, metadata) of a safetensors file; one ValueError naming the file and the entry if
    it is malformed. Each tensor owns its (writable) memory, read from the file once."""
    with open(path, "rb") as f:
        n, data_len = _header_length(f, path)
        header = _parse_header(f.read(n), path)
        metadata = _metadata(header.pop(_METADATA, None), path)
        entries = sorted((_entry(path, name, spec) for name, spec in header.items()), key=lambda e: (e.begin, e.end))
        _check_tiling(path, entries, data_len)
        return {e.name: _read(f, e, path) for e in entries}, metadata


def _header_length(f, path) -> Tuple[int, int]:
    """(header length, data length) from the first 8 bytes and the file's size."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file: shorter than its header length ({len(head)} bytes)")
    n = int.from_bytes(head, "little")
    if n > _MAX_HEADER:
        raise ValueError(f"{path}: header length {n} is over the {_MAX_HEADER:,}-byte limit")
    if n > size - 8:
        raise ValueError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
    return n, size - 8 - n


def _parse_header(raw: bytes, path) -> _Object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the header is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise ValueError(f"{path}: the header must be a JSON object, beginning with '{{', got {_REPR.repr(text)}")
    decoder = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_Constant, parse_int=_json_int)
    try:
        header, end = decoder.raw_decode(text)
    except RecursionError:
        raise ValueError(f"{path}: the header is not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise ValueError(f"{path}: the header is not valid JSON ({e})") from None
    if text[end:].strip(" "):
        raise ValueError(f"{path}: the header's JSON object is followed by {_REPR.repr(text[end:])}; "
                         "only spaces may pad it")
    if header.repeated:
        raise ValueError(f"{path}: {_REPR.repr(header.repeated[0])} appears more than once in the header")
    return header


def _metadata(meta, path) -> Dict[str, str]:
    if meta is None:  # the reference reads null as no metadata
        return {}
    where = f"{path}: {_METADATA}"
    if not isinstance(meta, _Object):
        raise ValueError(f"{where} must be an object of strings, got {_REPR.repr(meta)}")
    if meta.repeated:
        raise ValueError(f"{where} repeats the key {_REPR.repr(meta.repeated[0])}")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise ValueError(f"{where}: the value of {_REPR.repr(k)} must be a string, got {_REPR.repr(v)}")
        if not (_is_text(k) and _is_text(v)):
            raise ValueError(f"{where}: entry {_REPR.repr(k)} is not valid Unicode (a lone surrogate)")
    return dict(meta)


def _entry(path, name: str, spec) -> _Entry:
    """The checked header entry of tensor `name`; its size must match its dtype and shape."""
    where = f"{path}: tensor {_REPR.repr(name)}"
    if not _is_text(name):
        raise ValueError(f"{where}: the name is not valid Unicode (a lone surrogate)")
    if not isinstance(spec, _Object):
        raise ValueError(f"{where}: the entry must be an object with {', '.join(_KEYS)}, got {_REPR.repr(spec)}")
    if spec.repeated:
        raise ValueError(f"{where}: the entry repeats the key {_REPR.repr(spec.repeated[0])}")
    if set(spec) != set(_KEYS):
        missing, extra = [k for k in _KEYS if k not in spec], [k for k in spec if k not in _KEYS]
        raise ValueError(f"{where}: the entry must have exactly the keys {', '.join(_KEYS)}"
                         + (f"; it lacks {', '.join(missing)}" if missing else "")
                         + (f"; it has {_REPR.repr(extra)} besides" if extra else ""))
    dtype, shape, offsets = (spec[k] for k in _KEYS)
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"{where}: dtype {_REPR.repr(dtype)} is not one of {', '.join(_DTYPES)}")
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)):
        raise ValueError(f"{where}: shape must be a list of integers 0..2**63-1, got {_REPR.repr(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{where}: data_offsets must be [begin, end], integers with 0 <= begin <= end, "
                         f"got {_REPR.repr(offsets)}")
    begin, end = offsets
    nbytes = _nbytes(where, _DTYPES[dtype], shape)
    if end - begin != nbytes:
        raise ValueError(f"{where}: data_offsets {begin}..{end} hold {end - begin} bytes, but {dtype} shape "
                         f"{shape} needs {nbytes}")
    return _Entry(name, _DTYPES[dtype], shape, begin, end)


def _nbytes(where: str, dtype: torch.dtype, shape: List[int]) -> int:
    """Bytes of a tensor of this shape, or a ValueError if no tensor can have it."""
    numel = 1
    for d in shape:
        numel *= d
        # The reference counts elements in 64 bits, left to right, and refuses an overflow even
        # where a later 0 would empty the tensor: so do we.
        if numel > _MAX_U64:
            raise ValueError(f"{where}: shape {_REPR.repr(shape)} has more elements than 64 bits can count")
    try:  # torch's own stride checks (a 0 does not save [0, 2**40, 2**40]), allocating nothing
        torch.empty(shape, dtype=dtype, device="meta")
    except RuntimeError:
        raise ValueError(f"{where}: shape {_REPR.repr(shape)} is too large for a torch tensor") from None
    return numel * dtype.itemsize


def _check_tiling(path, entries: List[_Entry], data_len: int) -> None:
    """The tensors, in offset order, must cover the data exactly (as the spec demands: no file
    can then hide a second payload): no gap, no overlap, no trailing bytes."""
    end, last = 0, None
    for e in entries:
        where = f"{path}: tensor {_REPR.repr(e.name)} (data bytes {e.begin}..{e.end})"
        after = f"tensor {_REPR.repr(last)}" if last is not None else "the start of the data"
        if e.begin > end:
            raise ValueError(f"{where} leaves bytes {end}..{e.begin} unused after {after}")
        if e.begin < end:
            raise ValueError(f"{where} overlaps {after}, which ends at byte {end}")
        end, last = e.end, e.name
    if end > data_len:
        raise ValueError(f"{path}: tensor {_REPR.repr(last)} ends at data byte {end}, past the end of the file "
                         f"(the data holds {data_len} bytes)")
    if end < data_len:
        owner = f"after the last tensor {_REPR.repr(last)}" if last is not None else "and the header lists no tensors"
        raise ValueError(f"{path}: data bytes {end}..{data_len} belong to no tensor ({owner})")


def _read(f, e: _Entry, path) -> torch.Tensor:
    """Tensor `e`, read into its own buffer from the file's current position (its begin)."""
    if e.end == e.begin:
        return torch.empty(e.shape, dtype=e.dtype)  # frombuffer refuses an empty buffer
    buf = bytearray(e.end - e.begin)
    if f.readinto(buf) != len(buf):
        raise ValueError(f"{path}: tensor {_REPR.repr(e.name)}: the file ended inside its data (changed while read?)")
    if e.dtype is torch.bool and (bad := buf.translate(None, b"\x00\x01")):
        # Any other byte in a torch bool is undefined behaviour, not True.
        raise ValueError(f"{path}: tensor {_REPR.repr(e.name)}: a BOOL byte is {bad[0]}, not 0 or 1")
    return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape)


def save_file(tensors: Mapping[str, torch.Tensor], path, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write tensors (copied to CPU, contiguous; tensors that share memory as separate copies) and
    str -> str metadata as a safetensors file. What cannot be stored faithfully is refused with a
    ValueError before anything is written; the file appears at `path` complete or not at all."""
    items = _checked_tensors(tensors)
    header, offset = {}, 0
    for name, t in items:
        nbytes = t.numel() * t.dtype.itemsize
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata is not None:
        header[_METADATA] = _checked_metadata(metadata)
    blob = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does
    if len(blob) > _MAX_HEADER:
        raise ValueError(f"save_file: the header would be {len(blob):,} bytes, over the {_MAX_HEADER:,}-byte "
                         "limit that readers accept")

    def write(f):
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, t in items:
            _write_tensor(f, t)

    _write_atomically(Path(path), write)


def _checked_tensors(tensors) -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in file order, or a ValueError for anything safetensors cannot hold."""
    if not isinstance(tensors, Mapping):
        raise ValueError(f"save_file: tensors must be a dict of name -> tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        shown = _REPR.repr(name)
        if not isinstance(name, str):
            raise ValueError(f"save_file: tensor names must be strings, got {shown}")
        if name == _METADATA:
            raise ValueError(f"save_file: {_METADATA!r} is reserved for the metadata and cannot name a tensor")
        if not _is_text(name):
            raise ValueError(f"save_file: tensor name {shown} is not valid Unicode (a lone surrogate)")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"save_file: {shown} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or t.is_nested:
            raise ValueError(f"save_file: tensor {shown} is {'nested' if t.is_nested else t.layout}; "
                             "safetensors holds dense tensors only")
        if t.is_meta:
            raise ValueError(f"save_file: tensor {shown} is on the meta device and has no data to save")
        if t.dtype not in _NAMES:
            hint = " (save torch.view_as_real of it as F64)" if t.dtype == torch.complex128 else ""
            raise ValueError(f"save_file: tensor {shown} has dtype {t.dtype}, which safetensors cannot hold{hint}")
    # Largest elements first: after the 8-byte-aligned header every tensor then starts at a
    # multiple of its element size, which readers that map the file and view it in place need.
    return sorted(tensors.items(), key=lambda kv: (-kv[1].dtype.itemsize, kv[0]))


def _checked_metadata(metadata) -> Dict[str, str]:
    if not isinstance(metadata, Mapping):
        raise ValueError(f"save_file: metadata must be a dict of str -> str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not (isinstance(k, str) and isinstance(v, str)):
            raise ValueError(f"save_file: metadata must map str to str; {_REPR.repr(k)}: {_REPR.repr(v)} "
                             f"is {type(k).__name__} -> {type(v).__name__}")
        if not (_is_text(k) and _is_text(v)):
            raise ValueError(f"save_file: metadata entry {_REPR.repr(k)} is not valid Unicode (a lone surrogate)")
    return dict(metadata)


def _write_tensor(f, t: torch.Tensor) -> None:
    """t's bytes in C order; copied through a bytearray because tensors have no buffer protocol
    (and numpy is not a dependency)."""
    flat = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
    if t.dtype == torch.bool:
        flat = flat.ne(0).view(torch.uint8)  # a bool byte other than 0/1 (made by a view) is True, as 1
    if flat.numel():
        buf = bytearray(flat.numel())
        torch.frombuffer(buf, dtype=torch.uint8).copy_(flat)
        f.write(buf)


def _write_atomically(path: Path, write) -> None:
    """write(f) into a new file beside `path`, then move it onto `path` (os.replace is atomic), so
    that a failed save never leaves a truncated file there."""
    # Opened with "x" rather than by mkstemp, so the file gets the usual permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
