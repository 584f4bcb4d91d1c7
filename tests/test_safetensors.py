"""pysparse._safetensors: the dependency-free safetensors reader/writer models are saved with."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from pysparse._safetensors import load_file, save_file


def test_round_trip_every_dtype(tmp_path):
    t = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
         "i64": torch.arange(7), "i32": torch.arange(3, dtype=torch.int32), "i16": torch.arange(4, dtype=torch.int16),
         "u8": torch.arange(9, dtype=torch.uint8), "bool": torch.tensor([True, False]), "empty": torch.empty(0, 3)}
    save_file(t, tmp_path / "a.safetensors", {"format": "pysparse"})
    back, meta = load_file(tmp_path / "a.safetensors")
    assert meta == {"format": "pysparse"} and set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]), k


@pytest.mark.parametrize("damage,msg", [
    (lambda b: b[:5], r"shorter than its header length"),
    (lambda b: struct.pack("<Q", 10**9) + b[8:], r"runs past the end of the file"),
    (lambda b: b[:8] + b"{" * (len(b) - 8), r"header is not valid JSON"),
])
def test_damaged_files_are_refused(tmp_path, damage, msg):
    save_file({"x": torch.ones(4)}, tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(damage(raw))
    with pytest.raises(ValueError, match=msg):
        load_file(tmp_path / "b.safetensors")


def test_offsets_that_do_not_fit_the_shape_are_refused(tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    (tmp_path / "c.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(ValueError, match=r"tensor 'x' has offsets 0..12 that do not fit its F32 shape \[4\]"):
        load_file(tmp_path / "c.safetensors")
