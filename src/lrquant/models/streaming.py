"""Models larger than memory: a skeleton whose blocks hold no weights until their turn.

A streamed model is built from its config with every tensor on PyTorch's ``meta`` device (no
memory); what runs before and after the blocks (embeddings, final norm, head, rotary tables) is
then loaded for real, while each block is loaded from the safetensors files only when its turn
comes (:meth:`Stream.load`) and dropped afterwards (:meth:`Stream.release`). Weights are read
one tensor at a time from the files, in float32 like the in-memory loader, so a streamed block
computes exactly what the same block of a fully loaded model computes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from lrquant.arch import ArchSpec
from lrquant.errors import LrquantError
from lrquant.quant.apply import head_linears, replace_module

SHARD_INDEX = "model.safetensors.index.json"


class WeightFiles:
    """Where each tensor of a model folder's safetensors files is, read one tensor at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / SHARD_INDEX
        if (self.folder / "model.safetensors").is_file() or not index.is_file():
            files = sorted(p.name for p in self.folder.glob("*.safetensors") if p.name.startswith("model"))
            self.where = {}
            for name in files:
                with safe_open(self.folder / name, "pt") as f:
                    self.where.update(dict.fromkeys(f.keys(), name))
        else:
            self.where = dict(json.loads(index.read_text())["weight_map"])

    def read(self, names: list[str], dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each in ``dtype`` (None: as stored)."""
        missing = [name for name in names if name not in self.where]
        if missing:
            raise LrquantError(
                f"'{self.folder}' has no tensor {missing[0]} ({len(missing)} missing): its tensor names "
                "do not match the model's; quantize it without --stream, which maps them"
            )
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.where[name], []).append(name)
        for file, keys in by_file.items():
            with safe_open(self.folder / file, "pt") as f:
                for key in keys:
                    tensor = f.get_tensor(key)
                    out[key] = tensor if dtype is None else tensor.to(dtype)
        return out


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (Linux ``MemAvailable``), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def float32_bytes(folder: Path) -> int:
    """About the memory the weights in ``folder`` take in float32 (as the in-memory loader holds
    them): the safetensors files' size, scaled from the dtype its config names. Read from the
    files' sizes alone, before anything checks them."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    dtype = (
        str(config.get("dtype") or config.get("torch_dtype") or "float32") if isinstance(config, dict) else ""
    )
    width = {"float16": 2, "bfloat16": 2, "float64": 8}.get(dtype, 4)
    size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors") if p.name.startswith("model"))
    return size * 4 // width


def too_large(folder: Path, share: float = 0.6) -> bool:
    """Whether the model in ``folder`` would take more than ``share`` of the available memory
    in float32 (then it is streamed by default)."""
    available = available_memory()
    return available is not None and float32_bytes(folder) > share * available


@dataclass
class Stream:
    """The blocks of a skeleton model, loaded one at a time from ``files``.

    ``on_load`` are called, in order, with each block's name and the block just loaded: a
    quantized output folder's puts its quantizers back, a run's Hadamard rotations rotate it.
    """

    model: nn.Module
    arch: ArchSpec
    files: WeightFiles
    on_load: list[Callable[[str, nn.Module], None]] = field(default_factory=list)
    # outside the blocks, still on disk: an untied output head (needed only to evaluate and save)
    lazy: list[str] = field(default_factory=list)
    names: list[str] = field(init=False)
    skeletons: list[nn.Module] = field(init=False)  # the weightless blocks, as built

    def __post_init__(self) -> None:
        self.names, self.skeletons = (list(t) for t in zip(*self.arch.named_blocks(self.model), strict=True))

    def __len__(self) -> int:
        return len(self.names)

    def fresh(self, index: int) -> nn.Module:
        """A weightless copy of block ``index`` that shares the model's config (so the attention
        implementation the model is switched to applies to it too)."""
        config = self.model.config
        memo = {id(config): config, id(self.arch.config_of(self.model)): self.arch.config_of(self.model)}
        return copy.deepcopy(self.skeletons[index], memo)

    def weightless(self, index: int) -> nn.Module:
        """:meth:`fresh` with the :attr:`on_load` hooks run on it: a finished block's structure
        (run-time rotations), to be given its weights from elsewhere (the resume store)."""
        block = self.fresh(index)
        for hook in self.on_load:
            hook(self.names[index], block)
        return block

    def load(self, index: int, files: WeightFiles | None = None) -> nn.Module:
        """Load block ``index`` (from ``files``, default the model's) into the model, in float32;
        returns it."""
        block, name = self.fresh(index), self.names[index]
        keys = [f"{name}.{key}" for key in block.state_dict()]
        tensors = (files or self.files).read(keys)
        block.load_state_dict({key.removeprefix(f"{name}."): t for key, t in tensors.items()}, assign=True)
        for hook in self.on_load:
            hook(name, block)
        replace_module(self.model, name, block)
        return block

    def release(self, index: int) -> None:
        """Put the weightless block back in the model (the loaded one is freed once unreferenced)."""
        replace_module(self.model, self.names[index], self.skeletons[index])

    def load_lazy(self) -> None:
        """Load what was left on disk outside the blocks (an untied head), in float32."""
        if self.lazy:
            self.model.load_state_dict(self.files.read(self.lazy), strict=False, assign=True)
            self.lazy = []

    def to_float32(self) -> None:
        """Everything outside the blocks in memory in float32, as the in-memory loader holds it
        (before it is changed in place: Hadamard rotations of the embedding and the head)."""
        self.load_lazy()
        embedding = self.model.get_input_embeddings()
        if embedding.weight.dtype != torch.float32:
            embedding.weight = nn.Parameter(embedding.weight.float(), requires_grad=False)
            for key, hook in list(embedding._forward_hooks.items()):
                if hook is _float_output:
                    del embedding._forward_hooks[key]


def skeleton(
    cls, config, files: WeightFiles, arch: ArchSpec, trust_remote_code: bool = False
) -> tuple[nn.Module, list[str]]:
    """``cls`` (an ``AutoModel...`` class) built from ``config`` with no block weights in memory;
    everything outside the blocks loaded from ``files`` in float32 (modules whose buffers are
    not in the checkpoint, such as rotary tables, are built again from the config), except an
    untied output head, left on disk (returned: its tensor names), and then a plain embedding
    table, kept in its stored 16-bit type with its lookups made float32 (the same values)."""
    with torch.device("meta"):
        model = cls.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    blocks = {name for name, _ in arch.named_blocks(model)}

    def outside(name: str) -> bool:
        return not any(name == b or name.startswith(f"{b}.") for b in blocks)

    keys = [key for key in model.state_dict(keep_vars=True) if outside(key)]
    present = [key for key in keys if key in files.where]
    lazy = _untied_heads(model, arch, files)
    narrow = _narrow_embedding(model, files) if lazy else None
    stored = [key for key in present if key not in lazy and key != narrow]
    model.load_state_dict(files.read(stored), strict=False, assign=True)
    if narrow is not None:  # kept as stored; the lookup is exact, its output float32
        model.load_state_dict(files.read([narrow], None), strict=False, assign=True)
        model.get_input_embeddings().register_forward_hook(_float_output)
    model.tie_weights()
    stale = [
        (name, buffer)
        for name, buffer in model.named_buffers()
        if buffer.is_meta and outside(name) and name not in files.where
    ]
    if stale:  # computed at construction (rotary tables, embedding scales): from a one-block copy
        shell = dict(_shell(cls, config, trust_remote_code).named_buffers())
        for name, _ in stale:
            module_name, _, attr = name.rpartition(".")
            if name not in shell:
                raise LrquantError(
                    f"{name} is not in the checkpoint and cannot be rebuilt: quantize without --stream"
                )
            setattr(model.get_submodule(module_name), attr, shell[name])
    left = sorted(
        n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta and outside(n) and n not in lazy
    )
    if left:
        raise LrquantError(
            f"'{files.folder}' lacks {left[0]} ({len(left)} tensors missing): the checkpoint is "
            "incomplete or made for another config.json; copy or re-create it"
        )
    for name, block in arch.named_blocks(model):
        odd = [n for n, b in block.named_buffers() if n not in block.state_dict()]
        if odd:
            raise LrquantError(
                f"the blocks of {type(model).__name__} hold tensors outside the checkpoint "
                f"({name}.{odd[0]}): they cannot be streamed; quantize without --stream"
            )
    return model, lazy


def _untied_heads(model: nn.Module, arch: ArchSpec, files: WeightFiles) -> list[str]:
    """The weights of the output heads that the checkpoint stores apart from the embedding."""
    embedding = model.get_input_embeddings()
    return [
        f"{name}.weight"
        for name, head in head_linears(model, arch)
        if head.weight is not embedding.weight and f"{name}.weight" in files.where
    ]


def _narrow_embedding(model: nn.Module, files: WeightFiles) -> str | None:
    """The key of a plain ``nn.Embedding`` table stored in 16 bits, else None."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding:  # a scaled embedding computes in its own type
        return None
    key = next((k for k, p in model.named_parameters() if p is embedding.weight), None)
    if key is None or key not in files.where:
        return None
    with safe_open(files.folder / files.where[key], "pt") as f:
        stored = f.get_slice(key).get_dtype()
    return key if stored in ("BF16", "F16") else None


def _float_output(_module: nn.Module, _args, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def _shell(cls, config, trust_remote_code: bool) -> nn.Module:
    """The model with one block of each kind and a vocabulary of 8, built for real: what it computes at
    construction outside the blocks does not depend on the depth or the vocabulary."""
    small = copy.deepcopy(config)
    text = small.get_text_config() if hasattr(small, "get_text_config") else small
    kinds = list(dict.fromkeys(getattr(text, "layer_types", None) or [None]))
    text.num_hidden_layers = len(kinds)  # one block of each kind (sliding and full attention)
    text.vocab_size = 8
    if kinds != [None]:
        text.layer_types = kinds
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(text, key, None), int) and getattr(text, key) >= 8:
            setattr(text, key, None)
    return cls.from_config(small, dtype=torch.float32, trust_remote_code=trust_remote_code)


def streamed(model: nn.Module, arch: ArchSpec) -> bool:
    """Whether ``model``'s blocks are a stream's weightless skeletons."""
    return any(t.is_meta for block in arch.block_list(model) for t in block.parameters())


class StopForward(Exception):
    """Raised by the last stand-in of :func:`stand_ins` with ``stop``: nothing after the blocks runs."""


class _StandIn(nn.Module):
    """Takes a block's place while its weights are not in memory: tells ``seen`` how it was
    called and passes the hidden states on (the last block returns ``output`` when given, or
    stops the forward with ``stop``)."""

    def __init__(self, block: nn.Module, index: int, seen, output: torch.Tensor | None, stop: bool) -> None:
        super().__init__()
        self.index, self.seen, self.output, self.stop = index, seen, output, stop
        self.__dict__["block"] = block  # not a submodule: its (meta) tensors stay out of the model

    def forward(self, hidden, *args, **kwargs):
        if self.seen is not None:
            self.seen(self.index, self.block, (hidden, *args), kwargs)
        if self.stop:
            raise StopForward
        return hidden if self.output is None else self.output


@contextmanager
def stand_ins(
    model: nn.Module, arch: ArchSpec, seen=None, output: torch.Tensor | None = None, stop: bool = False
) -> Iterator[None]:
    """Within: every block of ``model`` is a stand-in that passes its input on, calling
    ``seen(index, block, args, kwargs)`` first; with ``output``, the last block returns it, so the
    model's forward computes what follows the blocks (final norm, head) from it; with ``stop``,
    the last block raises :class:`StopForward` instead (after ``seen``)."""
    named = arch.named_blocks(model)
    last = len(named) - 1
    try:
        for index, (name, block) in enumerate(named):
            here = index == last
            replace_module(model, name, _StandIn(block, index, seen, output if here else None, stop and here))
        yield
    finally:
        for name, block in named:
            replace_module(model, name, block)
