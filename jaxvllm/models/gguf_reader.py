"""A lean GGUF (v2/v3) reader: metadata and tensor table parsed with `struct`, tensor data
memory-mapped, string arrays (a vocabulary, merges) kept as offsets and decoded only when
asked for. `gguf.GGUFReader` builds numpy views of every field part, which takes seconds for a
49k-token vocabulary; reading weights needs none of that.

Layout: "GGUF", version u32, tensor count u64, metadata count u64; metadata entries
(key string, value type u32, value); tensor infos (name, n_dims u32, dims u64 fastest-first,
type u32, offset u64); padding to `general.alignment` (32); tensor data.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    type_id: int
    offset: int  # from the start of the file


class _LazyStrings:
    """A GGUF string array decoded on first use."""

    def __init__(self, buf, spans):
        self._buf, self._spans, self._values = buf, spans, None

    def get(self) -> list[str]:
        if self._values is None:
            b = self._buf
            self._values = [bytes(b[s:e]).decode("utf-8", errors="replace") for s, e in self._spans]
        return self._values


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self._mmap)
        self._pos = 0
        if bytes(self._buf[:4]) != b"GGUF":
            raise ValueError("missing the GGUF magic bytes")
        self._pos = 4
        self.version = self._u("I")
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._u("Q"), self._u("Q")
        self._fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self._fields[key] = self._value(self._u("I"))
        self.tensors: list[TensorInfo] = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._u("Q") for _ in range(self._u("I")))
            type_id, offset = self._u("I"), self._u("Q")
            self.tensors.append(TensorInfo(name, dims, type_id, offset))
        alignment = int(self.field("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        for t in self.tensors:
            t.offset += data_start

    # -- parsing ------------------------------------------------------------------------------

    def _u(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self._pos + size > len(self._buf):
            raise ValueError("truncated file")
        (value,) = struct.unpack_from("<" + fmt, self._buf, self._pos)
        self._pos += size
        return value

    def _string_span(self) -> tuple[int, int]:
        n = self._u("Q")
        start = self._pos
        if start + n > len(self._buf):
            raise ValueError("truncated file")
        self._pos += n
        return start, start + n

    def _string(self) -> str:
        s, e = self._string_span()
        return bytes(self._buf[s:e]).decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._u(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._u("I"), self._u("Q")
            if etype == _STRING:
                return _LazyStrings(self._buf, [self._string_span() for _ in range(count)])
            if etype in _SCALARS:
                fmt = _SCALARS[etype]
                size = struct.calcsize(fmt)
                if self._pos + size * count > len(self._buf):
                    raise ValueError("truncated file")
                values = np.frombuffer(self._buf, dtype=np.dtype("<" + fmt), count=count,
                                       offset=self._pos)
                self._pos += size * count
                return values.tolist()
            return [self._value(etype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")

    # -- access -------------------------------------------------------------------------------

    def field(self, key: str, default: Any = None) -> Any:
        value = self._fields.get(key, default)
        return value.get() if isinstance(value, _LazyStrings) else value

    def raw(self, t: TensorInfo, nbytes: int) -> np.ndarray:
        if t.offset + nbytes > len(self._mmap):
            raise ValueError(f"{self.path}: tensor {t.name!r} extends past the end of the file")
        return self._mmap[t.offset:t.offset + nbytes]
