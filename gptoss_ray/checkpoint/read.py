"""Read gpt-oss checkpoints: safetensors shards (with or without an index), MXFP4 experts
kept packed, and expert slices read through `safe_open(...).get_slice` so that an
expert-parallel worker touches only its own experts' bytes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gptoss_ray.checkpoint.names import TensorSpec, tensor_specs
from gptoss_ray.config import ModelConfig
from gptoss_ray.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
_DTYPE_BYTES = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "F64": 8}


class CheckpointReader:
    """Name -> tensor access over a checkpoint directory. Validates every tensor's
    presence and shape against the config up front, so a bad checkpoint fails at once
    with the tensor's name rather than deep inside a forward pass."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = ModelConfig.from_json_file(self.path / "config.json")
        self._handles: dict[str, object] = {}
        self._file_of = self._read_weight_map()
        self.is_mxfp4 = any(n.endswith("_blocks") for n in self._file_of)
        self.specs: dict[str, TensorSpec] = {s.name: s for s in tensor_specs(self.config, mxfp4=self.is_mxfp4)}
        self._check_shapes()

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}")
        weight_map = {}
        for f in files:
            weight_map.update({name: f.name for name in self._open(f.name).keys()})
        return weight_map

    def _open(self, file_name: str):
        if file_name not in self._handles:
            path = self.path / file_name
            if not path.is_file():
                raise CheckpointError(f"{path}: file named in {INDEX_FILE} is missing")
            try:
                self._handles[file_name] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: unreadable safetensors file ({e}); re-download it") from None
        return self._handles[file_name]

    def _slice(self, name: str):
        if name not in self._file_of:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing from the checkpoint")
        return self._open(self._file_of[name]).get_slice(name)

    def _check_shapes(self) -> None:
        for name, spec in self.specs.items():
            shape = tuple(self._slice(name).get_shape())
            if shape != spec.shape:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' has shape {list(shape)}, expected {list(spec.shape)} "
                    f"from config.json"
                )

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A whole tensor (MXFP4 blocks and scales stay uint8)."""
        t = self._read(name, None)
        return t if dtype is None or t.dtype == torch.uint8 else t.to(dtype)

    def get_experts(self, name: str, start: int, end: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Experts [start, end) of an expert tensor (dim 0), reading only their bytes."""
        t = self._read(name, slice(start, end))
        return t if dtype is None or t.dtype == torch.uint8 else t.to(dtype)

    def _read(self, name: str, rows: slice | None) -> torch.Tensor:
        try:
            sl = self._slice(name)
            return sl[rows] if rows is not None else sl[:]
        except SafetensorError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{name}' ({e}); the file may be truncated") from None

    def nbytes(self, name: str) -> int:
        """Size of a tensor on disk, from the header alone."""
        sl = self._slice(name)
        count = 1
        for d in sl.get_shape():
            count *= d
        return count * _DTYPE_BYTES[sl.get_dtype()]

    def element_bytes(self, name: str) -> int:
        """Bytes per stored element (1 for packed MXFP4 blocks and their scales)."""
        return _DTYPE_BYTES[self._slice(name).get_dtype()]

    def file_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self._file_of.values()))
