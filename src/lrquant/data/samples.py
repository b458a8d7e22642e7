"""Calibration samples made of several tensors (a vision-language model's token ids and pixels),
handled like one tensor whose first dimension counts the samples: indexed, sliced, iterated,
moved and joined. Text windows and images stay plain tensors; :func:`cat` joins either kind."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Samples:
    """Named tensors with the same first dimension: ``samples["input_ids"]`` is one field;
    ``samples[i]`` sample ``i`` (each field without its first dimension), ``samples[a:b]`` (or
    an index tensor) a subset."""

    fields: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        sizes = {name: t.shape[0] for name, t in self.fields.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"samples need fields of one length, got {sizes}")

    @property
    def shape(self) -> torch.Size:
        """``(n,)``: the number of samples, where code reads ``shape[0]`` of a tensor."""
        return torch.Size([next(iter(self.fields.values())).shape[0]])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, str):
            return self.fields[index]
        if isinstance(index, int):
            return Sample({name: t[index] for name, t in self.fields.items()})
        return Samples({name: t[index] for name, t in self.fields.items()})

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def to(self, device) -> Samples:
        return Samples({name: t.to(device) for name, t in self.fields.items()})

    def sum(self) -> torch.Tensor:
        """Every field's sum, added up (a checksum of the samples, as a tensor's sum is)."""
        return sum(t.double().sum() for t in self.fields.values())


class Sample(dict):
    """One sample of :class:`Samples`: its fields by name, each without the samples dimension."""

    def to(self, device) -> Sample:
        return Sample({name: t.to(device) for name, t in self.items()})


def cat(parts: list) -> torch.Tensor | Samples:
    """Join sample sets of one kind along the samples: tensors or :class:`Samples`."""
    if all(isinstance(p, Samples) for p in parts):
        return Samples({name: torch.cat([p.fields[name] for p in parts]) for name in parts[0].fields})
    return torch.cat(parts)
