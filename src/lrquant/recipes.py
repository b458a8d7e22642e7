"""Named quantization recipes and budget presets, as data.

A recipe switches the ingredients of the block-wise learner on and off; ablations are a recipe
with one switch flipped (``lrquant quantize --set rotation=false``). A preset sets the budget:
calibration samples and epochs.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from lrquant.config import describe_validation_error
from lrquant.errors import LrquantError
from lrquant.modalities import Rule, Situation, modality_named
from lrquant.transforms.hadamard import HadamardMode


class Recipe(BaseModel):
    """Every switch of a quantization run. ``learn=False`` means one-shot (no training)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learn: bool = True
    # "best": per block, whichever of LAE, SmoothQuant (alpha) and none gives the lowest calibration loss
    smoothing: Literal["lae", "smoothquant", "ones", "best"] | None = "lae"
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    # smoothing="best" scores each candidate on this many of the first calibration samples
    init_samples: int = Field(8, ge=1)
    shifts: Literal["auto", "on", "off"] = "auto"
    qk_smoothing: bool = True
    clipping: bool = True
    # where the clipping bounds start: just inside min/max (the paper's sigmoid(4)), or per group at
    # the shrink factor with the lowest input-weighted rounding error ("search")
    clip_init: Literal["minmax", "search"] = "minmax"
    # LRQuant+'s rotation vectors: a learned multiplier per weight row (not the Hadamard rotations of
    # ``hadamard`` below)
    rotation: bool = True
    # learnable rounding (not part of LRQuant+; SignRound's idea): an offset per weight, within half a
    # grid step, added before rounding, so each weight may round the other way
    rounding: bool = False
    # GPTQ (error feedback through the inputs' Hessian; not part of LRQuant+): rounds the final
    # weights on the grid the learned clipping and rotation vectors chose, instead of to nearest
    gptq: bool = False
    gptq_damp: float = Field(0.01, gt=0)
    # Hadamard rotations before learning (transforms/hadamard.py): "folded" rotates the residual
    # stream and each value head, folded into the weights; "online" also rotates the down
    # projection's input at run time; "down" rotates only that; "inputs" rotates every linear's
    # input in the blocks at run time (any architecture, vision transformers included)
    hadamard: HadamardMode = "off"
    # epochs of end-to-end tuning of each weight group's step size after the block-wise pass,
    # on the KL divergence from the full-precision next-token distribution (methods/e2e.py;
    # EfficientQAT's E2E-QP, not part of LRQuant+); 0: off
    e2e_epochs: int = Field(0, ge=0)
    # 3e-3 against 1e-3 on SmolLM2 at fast (docs/results.md): W2A16 g64 47.24 vs 50.41, W4A16 18.54 vs 18.65;
    # 1e-2 was worse (54.66)
    lr_e2e: float = Field(3e-3, gt=0)
    # windows the end-to-end step trains on: the first e2e_samples of the same seeded sequence as
    # the block-wise pass's (more windows than the block-wise pass costs one full-precision
    # forward each, before quantizing); 0: the block-wise pass's windows
    e2e_samples: int = Field(0, ge=0)
    # the end-to-end learning rate: constant, or cosine-decayed to 0 over all its steps
    e2e_schedule: Literal["constant", "cosine"] = "constant"
    mse: bool = True
    nlc: bool = True
    dynamic_weighting: bool = True
    error_propagation: bool = True
    homologous: bool = True
    epochs: int = Field(4, ge=0)
    nsamples: int = Field(64, ge=1)
    batch_size: int = Field(1, ge=1)
    lr_transform: float = Field(5e-3, gt=0)
    lr_clipping: float = Field(1e-2, gt=0)
    lr_rounding: float = Field(5e-3, gt=0)
    # lr_transform is for 4-bit grids: with wider ones it halves for every bit the narrowest
    # quantized tensor has above 4 (W6A6: a quarter). Adam moves each parameter by about the rate
    # per step whatever the size of the error, while the error the smoothing can trade between
    # weights and inputs halves with each bit. DINOv2 W6A6, six seeds (docs/results.md): 0.9940 / 93.5 %
    # against 0.9931 / 92.5 % without; scaling lr_clipping as well was worse (0.9933 / 93.2 %).
    lr_by_bits: bool = False
    # the dtype the block-wise pass keeps the calibration chains in (methods/activations.py)
    chain_dtype: Literal["float32", "bfloat16"] = "float32"
    bf16: bool | Literal["auto"] = "auto"  # bf16 autocast while learning; auto: where matmuls are native
    compile: bool = True  # fuse fake quantization with torch.compile while learning (eager if unavailable)
    max_retries: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _something_to_learn(self) -> Recipe:
        if self.learn and not (self.mse or self.nlc):
            raise ValueError("mse and nlc are both off, so there is no loss to learn from: keep one of them")
        if self.learn and not (self.error_propagation or self.homologous):
            raise ValueError(
                "error_propagation and homologous are both off, so there is no target to learn: "
                "keep one of them"
            )
        if self.clip_init == "search" and not (self.learn and self.clipping):
            raise ValueError(
                "clip_init=search sets where the learned clipping bounds start: needs learn and clipping on"
            )
        if self.rounding and not self.learn:
            raise ValueError("rounding offsets are learned: rounding needs learn on")
        if self.rounding and self.gptq:
            # Tried: GPTQ's choice as the offsets' start made W2A16 g64 worse on SmolLM2-135M
            # (94.65 against 70.83 from round-to-nearest, docs/results.md "GPTQ rounding").
            raise ValueError(
                "rounding and gptq both decide which way each weight rounds: keep one of them "
                "(rounding=true measured better on SmolLM2 at 2, 3 and 4 bits)"
            )
        shaping = (("e2e_samples", 0), ("e2e_schedule", "constant"))
        tuned = [name for name, off in shaping if getattr(self, name) != off]
        if tuned and not self.e2e_epochs:
            raise ValueError(f"{', '.join(tuned)} shape the end-to-end step: set e2e_epochs as well")
        return self

    @property
    def calibration_samples(self) -> int:
        """How many calibration samples a run needs: the block-wise pass's, or the end-to-end
        step's when it trains on more."""
        return max(self.nsamples, self.e2e_samples if self.e2e_epochs else 0)


RECIPES: dict[str, dict] = {
    "rtn": dict(learn=False, smoothing=None, clipping=False, rotation=False),
    "smoothquant": dict(
        learn=False, smoothing="smoothquant", qk_smoothing=False, clipping=False, rotation=False
    ),
    "gptq": dict(learn=False, smoothing=None, clipping=False, rotation=False, gptq=True),
    "omniquant": dict(
        smoothing="smoothquant", rotation=False, nlc=False, dynamic_weighting=False, homologous=False
    ),
    "lrquant": dict(rotation=False, dynamic_weighting=False, homologous=False),
    "lrquant_plus": dict(),
}
# No --method: LRQuant+ with what measured best for the setting and the model (each modality's
# rules: src/lrquant/modalities/text.py TEXT_RULES, image.py IMAGE_RULES)
AUTO = "auto"
DEFAULT_METHOD = AUTO

PRESETS: dict[str, dict] = {
    "fast": dict(nsamples=32, epochs=2),
    "default": dict(nsamples=64, epochs=4),
    # bf16 follows the default (auto), unlike the LRQuant reference code (always fp32; OmniQuant
    # uses fp16 autocast below 8 bits): at fast, bf16 against fp32 measured 55.66 vs 55.72 at W4A4
    # and 17.33 vs 17.43 at W6A6 on SmolLM2, and it makes the paper budget 1.3x faster on a CPU
    # with native bf16 (docs/results.md, "Time per budget")
    "paper": dict(nsamples=128, epochs=20),
}


@functools.cache
def fast_bf16(device: str) -> bool:
    """Whether bf16 matmuls run natively on ``device`` ("cpu" or "cuda").

    On a CPU without AMX or AVX-512 BF16 they are emulated and 50-100x slower than fp32 (measured:
    a 257x384x1536 product takes 230 ms in bf16 against 3.5 ms in fp32 on an AVX2-only Xeon);
    with AMX they are about 7x faster than fp32. Cached: it is asked on every training step.
    """
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return any(
        bool(getattr(torch.cpu, probe, lambda: False)())
        for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    )


def use_bf16(recipe: Recipe, device: str | torch.device) -> bool:
    """The recipe's bf16 switch, with ``auto`` decided by :func:`fast_bf16` for ``device``'s kind
    (any CUDA device counts as "cuda")."""
    if recipe.bf16 != "auto":
        return bool(recipe.bf16)
    kind = device if isinstance(device, str) else device.type
    return fast_bf16("cuda" if kind.startswith("cuda") else "cpu")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["epochs=3", "rotation=false"]`` -> a dict; pydantic converts the values."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LrquantError(f"--set expects key=value, got '{item}'")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


# A rule's fields yield to an override that clashes with them: (switch, the value it is set to)
# -> the rule fields dropped (None: all of them).
YIELDS: dict[tuple[str, bool], tuple[str, ...] | None] = {
    ("gptq", True): ("rounding",),  # both decide which way each weight rounds
    ("clipping", False): ("clip_init", "lr_clipping"),
    ("learn", False): None,  # nothing learned: the rule's learning switches do not apply
}
_SWITCH = TypeAdapter(bool)


def default_rule(situation: Situation) -> Rule:
    """The rule that decides the default recipe in ``situation``: the first of its modality's
    :attr:`~lrquant.modalities.Modality.rules` that applies."""
    return next(rule for rule in modality_named(situation.modality).rules if rule.applies(situation))


def _rule_fields(rule: Rule, overrides: dict) -> dict:
    """``rule``'s fields less those that yield to ``overrides`` (:data:`YIELDS`; a switch's value
    read as the recipe reads it, so ``off`` and ``false`` alike)."""
    fields = dict(rule.fields)
    for (switch, clash), dropped in YIELDS.items():
        try:
            if switch not in overrides or _SWITCH.validate_python(overrides[switch]) != clash:
                continue
        except ValidationError:
            continue  # not a bool: the recipe's validation says so
        for key in rule.fields if dropped is None else dropped:
            fields.pop(key, None)
    return fields


# Recipe fields taken out after they measured worse and joined no recipe or default (their
# measurements stay in docs/results.md): what to use instead.
RETIRED: dict[str, str] = {
    "gptq_target": "GPTQ's own target (gptq=true alone) measured better than gptq_target=fp "
    '(docs/results.md, "GPTQ rounding"); drop it',
    "gptq_sequential": "rounding a block's linears stage by stage measured no better and took "
    '40-50 % more time (docs/results.md, "GPTQ rounding"); use gptq=true alone',
    "schedule": "the cosine block-wise schedule measured no better than a constant rate "
    '(docs/results.md, "DINOv2-small backbone"); drop it',
    "holdout": "keeping each block's best state on held-out crops measured no better "
    '(docs/results.md, "DINOv2-small backbone"); drop it',
    "e2e_norms": "also tuning the norms and biases end to end helped W4A16 by 0.5 % and hurt W3A16 g128 "
    '(docs/results.md, "End-to-end step sizes"); drop it',
    "down_smoothing": "smoothing the down projection's input made W4A4 worse "
    '(docs/results.md, "Smoothing the down projection"); drop it',
}


def build_recipe(
    method: str,
    preset: str = "default",
    overrides: dict | None = None,
    modality: str = "text",
    situation: Situation | None = None,
) -> Recipe:
    """The recipe of ``method`` with ``preset``'s budget and explicit ``overrides`` on top.

    ``auto`` (the default method) is LRQuant+ with the fields of the first of the modality's
    rules that applies to ``situation`` (:func:`default_rule`; by default: ``modality``, 4-bit
    weights only)."""
    if method != AUTO and method not in RECIPES:
        raise LrquantError(f"unknown method '{method}'; available: {AUTO}, {', '.join(RECIPES)}")
    if preset not in PRESETS:
        raise LrquantError(f"unknown preset '{preset}'; available: {', '.join(PRESETS)}")
    overrides = overrides or {}
    for key in RETIRED.keys() & set(overrides):
        raise LrquantError(f"the recipe setting {key} was retired: {RETIRED[key]}")
    if method == AUTO:
        rule = default_rule(situation or Situation(modality, 4, 16))
        base = _rule_fields(rule, overrides)
    else:
        base = RECIPES[method]
    fields = {**PRESETS[preset], **base, **overrides}
    if fields.get("smoothing") in ("none", "None", "off"):
        fields["smoothing"] = None
    try:
        recipe = Recipe(**fields)
    except ValidationError as err:
        raise LrquantError(
            describe_validation_error(err, f"invalid recipe settings for '{method}'")
        ) from None
    return recipe
