"""A memory-mapped reader of `.safetensors` files (numpy only, no torch), with errors that
name the file and what is wrong with it.

Format: 8-byte little-endian header length, a JSON header mapping tensor names to
`{dtype, shape, data_offsets: [begin, end]}` relative to the end of the header, then data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """Tensors of one file as read-only numpy views over a memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: safetensors file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{self.path}: corrupt safetensors file: shorter than its 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{self.path}: corrupt safetensors header: declared length "
                                 f"{header_len} bytes exceeds the file ({size} bytes)")
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: corrupt safetensors header: {e}") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._data_len = size - self._data_start
        self._entries = {}
        for name, entry in header.items():
            try:
                dtype = _DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except KeyError as e:
                raise ValueError(f"{self.path}: corrupt safetensors header: tensor {name!r} has "
                                 f"unsupported or missing field {e.args[0]!r}") from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if end - begin != nbytes or end > self._data_len or begin < 0:
                raise ValueError(f"{self.path}: corrupt safetensors header: tensor {name!r} "
                                 f"offsets {begin}..{end} do not fit shape {shape} or the file")
            self._entries[name] = (dtype, shape, begin)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if self._data_len > 0 else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin = self._entries[name]
        count = int(np.prod(shape, dtype=np.int64))
        start = self._data_start + begin
        if count == 0:
            return np.zeros(shape, dtype)
        return np.frombuffer(self._mmap, dtype=dtype, count=count, offset=start).reshape(shape)


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: the sharded index's files, or every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index}: invalid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weight files found "
                                "(PyTorch .bin checkpoints are not supported; convert them to safetensors)")
    return files
