"""Reading and writing safetensors files one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
offsets) and the raw bytes. We read one tensor at a time, and write by computing the header
first and then streaming each tensor's bytes, so neither direction ever holds more than one
converted tensor beside the weights themselves.
Our own reader rather than `safetensors.safe_open(framework="numpy")`, because numpy has no
bfloat16 there (`ml_dtypes`, which JAX ships, gives us one); the tests check both directions
against the `safetensors` and `transformers` implementations.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from alpaca_jax.hf.errors import ConversionError

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its bytes come from `produce()` only when its turn comes."""
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsReader:
    """All tensors of a HF model directory (one file, or shards named by an index)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._location: dict[str, tuple[Path, dict]] = {}  # tensor name -> (file, header entry)
        self._data_start: dict[Path, int] = {}
        for path in self._files():
            header, data_start = _read_header(path)
            size = path.stat().st_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                if data_start + end > size:
                    raise ConversionError(f"{path}: tensor '{name}' ends at byte {data_start + end} "
                                          f"but the file has {size} bytes (truncated file?)")
                self._location[name] = (path, info)
            self._data_start[path] = data_start

    def _files(self) -> list[Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.directory / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise ConversionError(f"{index} names shard {f.name}, which does not exist")
            return files
        if (self.directory / SINGLE_FILE).is_file():
            return [self.directory / SINGLE_FILE]
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.directory}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors "
                                  f"(only safetensors weights are read, not .bin/.pth)")
        return files

    def names(self) -> list[str]:
        return list(self._location)

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def get(self, name: str) -> np.ndarray:
        """A fresh array read from the file (plain reads, not a memory map: mapped pages would
        count in the process's resident memory, doubling the peak while converting)."""
        info = self._info(name)
        path = self._location[name][0]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConversionError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ConversionError(f"{path}: tensor '{name}' has {end - begin} bytes, but shape "
                                  f"{list(shape)} of {info['dtype']} needs {math.prod(shape) * dtype.itemsize}")
        array = np.empty(shape, dtype)
        with open(path, "rb") as f:
            f.seek(self._data_start[path] + begin)
            f.readinto(memoryview(array.reshape(-1).view(np.uint8)))
        return array

    def _info(self, name: str) -> dict:
        if name not in self._location:
            raise ConversionError(f"{self.directory}: tensor '{name}' is missing from the safetensors files")
        return self._location[name][1]


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            raise ConversionError(f"{path}: not a safetensors file (unreadable header)") from None
    return header, 8 + length


def write_safetensors(path: Path, entries: list[TensorEntry]) -> None:
    """One file: header computed from shapes, then each tensor produced and written in turn."""
    header: dict = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _DTYPE_CODES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for e in entries:
            array = e.produce()
            if array.shape != e.shape or array.dtype != e.dtype:
                raise ConversionError(f"tensor '{e.name}': produced {array.dtype}{list(array.shape)}, "
                                      f"expected {e.dtype}{list(e.shape)}")
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)  # bytes: bf16 has no buffer format


def write_sharded(directory: Path, entries: Iterable[TensorEntry], max_shard_bytes: int) -> list[Path]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + index above `max_shard_bytes`."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(directory / name, shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for s in shards for e in s)},
                 "weight_map": {e.name: name for name, s in zip(names, shards) for e in s}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / n for n in names]
