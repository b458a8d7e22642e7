"""What a kind of model brings to a run: its data, its inputs, its evaluation, its end-to-end loss
and its default recipe rules. One :class:`Modality` per kind (text, image); the API, the learner and
the recipes ask it instead of branching on the kind themselves."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from lrquant.api import DataSettings
    from lrquant.arch import ArchSpec
    from lrquant.models.loading import LoadedModel


@dataclass(frozen=True)
class Situation:
    """What the default recipe is chosen by."""

    modality: str  # a Modality's name: "text" or "image"
    wbits: int  # 16: weights not quantized
    abits: int  # 16: activations not quantized
    packed: bool = False  # a packed format was asked for: no Hadamard rotation at run time
    # the residual stream can be Hadamard-rotated (decoders with plain RMSNorm)
    rotatable: bool = True
    group_size: int | None = None  # the weights' group; None: per output channel

    @classmethod
    def of(cls, scheme, modality: str = "text", packed: bool = False, rotatable: bool = True) -> Situation:
        weight = scheme.weight
        return cls(modality, weight.bits, scheme.activation.bits, packed, rotatable, weight.group_size)


@dataclass(frozen=True)
class Rule:
    """One line of a modality's default recipe: where it applies, what it adds to LRQuant+, and
    the measurement that chose it (docs/results.md)."""

    when: str
    applies: Callable[[Situation], bool]
    fields: dict
    why: str

    def as_dict(self) -> dict:
        """What the report and ``--explain --json`` say of the rule."""
        return {"when": self.when, "fields": self.fields, "why": self.why}


@dataclass
class Evaluation:
    """A run's evaluation in two calls: ``fp()`` scores the model before quantizing (and keeps
    what the quantized model is compared with), ``quantized()`` after. ``details`` go to the
    report's data section; ``fidelity`` fills in during ``quantized()`` where the modality
    measures it apart from the main score (a language model's KL and top-1 agreement); ``more``
    during both (a task's accuracy, where the evaluation data have answers)."""

    fp: Callable[[], object]
    quantized: Callable[[], object]
    details: dict
    fidelity: dict = field(default_factory=dict)
    # more measures by stage, filled in as the stages run: {"accuracy": {"fp": ..., "quantized": ...}}
    more: dict = field(default_factory=dict)


class Modality(ABC):
    """A kind of model input. Subclasses fill in the class attributes and the methods."""

    name: ClassVar[str]
    default_calib: ClassVar[str]  # calibration source when none is given
    default_eval: ClassVar[str]  # evaluation source when none is given
    # calibration samples when none are asked for: None takes the preset's count
    default_samples: ClassVar[int | None] = None
    report_key: ClassVar[str]  # where the report holds the evaluation
    e2e_measure: ClassVar[str]  # what the end-to-end step's loss is called in its log lines
    rules: ClassVar[tuple[Rule, ...]]  # the default recipe: the first that applies

    def settings(self, data: DataSettings, loaded: LoadedModel) -> DataSettings:
        """``data`` with this modality's defaults filled in, refused where it makes no sense."""
        return replace(data, calib=data.calib or self.default_calib, eval=data.eval or self.default_eval)

    @abstractmethod
    def calibration(self, loaded: LoadedModel, data: DataSettings, n: int) -> torch.Tensor:
        """``n`` seeded calibration samples, stacked."""

    @abstractmethod
    def model_inputs(self, sample: torch.Tensor) -> dict:
        """The keyword arguments that run the model on one sample."""

    @abstractmethod
    def evaluation(
        self,
        loaded: LoadedModel,
        data: DataSettings,
        device: torch.device,
        full_precision: Callable[[], nn.Module],
    ) -> Evaluation:
        """How a quantize run scores the model before and after (``full_precision`` loads the
        full-precision model again, for comparisons after the one in memory is quantized)."""

    @abstractmethod
    def evaluate(
        self, loaded: LoadedModel, data: DataSettings, reference: nn.Module | None, device: torch.device
    ) -> dict:
        """``lrquant eval``'s scores of ``loaded`` (against ``reference`` when given)."""

    @abstractmethod
    def data_report(self, data: DataSettings, calibration: torch.Tensor | None) -> dict:
        """What the report's data section says of this modality's sample shape."""

    # ----------------------------------------------------------------- the end-to-end step

    @abstractmethod
    def check_end_to_end(self, model: nn.Module, arch: ArchSpec) -> None:
        """Refuse, before any work, a model the end-to-end loss cannot be computed for."""

    @abstractmethod
    def end_to_end_norm(self, model: nn.Module, arch: ArchSpec) -> nn.Module | None:
        """The module that the full-precision last hidden states pass through for the loss."""

    @abstractmethod
    def end_to_end_loss(
        self,
        model: nn.Module,
        arch: ArchSpec,
        inputs: dict,
        fp_hidden: torch.Tensor,
        norm: nn.Module | None,
        autocast,
    ) -> torch.Tensor:
        """The end-to-end loss of the quantized ``model`` on ``inputs`` against the full-precision
        model's last hidden states ``fp_hidden`` for them; the forward runs within ``autocast()``."""


def last_module(model: nn.Module, arch: ArchSpec) -> nn.Module:
    """The module whose output the chains hold at the end: the last block, or what runs after it
    (Swin's patch merging, where a model has one there)."""
    blocks = arch.block_list(model)
    return arch.transitions(model).get(len(blocks) - 1, blocks[-1])


class LastHidden:
    """Within ``with``: ``.value`` holds the last hidden state of the latest forward."""

    def __init__(self, model: nn.Module, arch: ArchSpec) -> None:
        self.module, self.value = last_module(model, arch), None

    def _keep(self, _module: nn.Module, _args: tuple, output) -> None:
        self.value = output[0] if isinstance(output, tuple) else output

    def __enter__(self) -> LastHidden:
        self.handle = self.module.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
