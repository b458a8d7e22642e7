"""An output folder's tensors read one at a time, so that export holds one tensor, not a model.

:class:`LazyTensors` maps tensor keys to the tensors of safetensors files, reading the shapes and
dtypes from the files' headers and a tensor only when it is asked for; :class:`LazyLinears`
maps a quantized linear's name to its :class:`~lrquant.export.IntegerLinear` the same way. A
writer that asks for one tensor at a time (GGUF's) holds one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from lrquant.config import QuantSpec

if TYPE_CHECKING:
    from lrquant.export import IntegerLinear

# safetensors' dtype names
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LazyTensors(Mapping[str, torch.Tensor]):
    """Tensors by key, each read from its safetensors file when asked for."""

    def __init__(
        self, where: dict[str, tuple[Path, str]], meta: dict[str, tuple[tuple[int, ...], str]]
    ) -> None:
        self._where = where  # key -> (file, the key in the file)
        self._meta = meta  # key -> (shape, safetensors dtype)

    @classmethod
    def of(cls, files: list[Path]) -> LazyTensors:
        """Every tensor of ``files`` (later files win a key both hold)."""
        where, meta = {}, {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    where[key] = (file, key)
                    meta[key] = (tuple(piece.get_shape()), piece.get_dtype())
        return cls(where, meta)

    def __getitem__(self, key: str) -> torch.Tensor:
        file, stored = self._where[key]
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._meta[key][1]]

    def renamed(self, name: Callable[[str], str | None]) -> LazyTensors:
        """The same tensors keyed ``name(key)`` (None: left out)."""
        keys = {key: name(key) for key in self._where}
        return LazyTensors(
            {new: self._where[key] for key, new in keys.items() if new is not None},
            {new: self._meta[key] for key, new in keys.items() if new is not None},
        )

    def without(self, keys) -> LazyTensors:
        """The same tensors less ``keys``."""
        gone = set(keys)
        return self.renamed(lambda key: None if key in gone else key)


class LazyLinears(Mapping[str, "IntegerLinear"]):
    """Quantized linears by name, each built from the integer weights file (its codes, steps and
    zero points, keys ``NAME.codes`` and so on) and its bias (``NAME.bias`` of ``biases``) when
    asked for; ``spec`` gives each linear's weight grid."""

    def __init__(self, parts: LazyTensors, spec: Callable[[str], QuantSpec], biases: LazyTensors) -> None:
        self._parts, self._spec, self._biases = parts, spec, biases
        self._names = dict.fromkeys(key.rpartition(".")[0] for key in parts)  # ordered, as a set

    def __getitem__(self, name: str) -> IntegerLinear:
        from lrquant.export import IntegerLinear

        if name not in self._names:
            raise KeyError(name)
        spec = self._spec(name)
        return IntegerLinear(
            codes=self._parts[f"{name}.codes"],
            scale=self._parts[f"{name}.scale"],
            zero=self._parts[f"{name}.zero"],
            bias=self._biases.get(f"{name}.bias"),
            bits=spec.bits,
            symmetric=spec.symmetric,
            group_size=spec.group_size,
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:  # Mapping's would read the linear
        return name in self._names

    def has_bias(self, name: str) -> bool:
        return f"{name}.bias" in self._biases

    def shape(self, name: str) -> tuple[int, ...]:
        """The linear's ``[out, in]``."""
        return self._parts.shape(f"{name}.codes")

    def renamed(self, name: Callable[[str], str | None]) -> LazyLinears:
        """The same linears named ``name(old)`` (None: left out), and the tensors their biases
        are looked up in keyed by ``name(key)``."""

        def part(key: str) -> str | None:
            owner, _, kind = key.rpartition(".")
            new = name(owner)
            return None if new is None else f"{new}.{kind}"

        old_of = {name(old): old for old in self._names if name(old) is not None}
        return LazyLinears(
            self._parts.renamed(part), lambda new: self._spec(old_of[new]), self._biases.renamed(name)
        )
