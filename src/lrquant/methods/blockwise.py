"""The block-wise learner behind OmniQuant, LRQuant and LRQuant+.

For each transformer block in turn, one stage function after the other:

1. :func:`initialise`: run the full-precision block on the full-precision chain's input (target
   of the error-propagation branch) and on the quantized chain's input (target of the homologous
   branch), recording input statistics for the smoothing initialisation; quantize the block and
   attach its learnable transforms (smoothing scales and shifts, clipping bounds, rotation
   vectors); with ``smoothing="best"``, choose the smoothing initialisation;
2. :func:`search_clipping` (``clip_init="search"``): start the clipping bounds where the
   input-weighted rounding error is lowest;
3. :func:`train`: train the transforms so the quantized block on the quantized input matches
   both targets (MSE plus negative log cosine, dynamically weighted);
4. :func:`collect_statistics` (``gptq``): record each linear's input Hessian for GPTQ;
5. :func:`fold`: fold the transforms into the block's weights and quantize them for good (to
   nearest, or by GPTQ), then feed the quantized chain forward through the finished block.

The end-to-end step that may follow (``e2e_epochs``) is the caller's:
:func:`lrquant.methods.e2e.run_end_to_end`, on what :func:`quantize_blockwise` returns.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from lrquant import distributed
from lrquant.arch import ArchSpec
from lrquant.config import QuantScheme
from lrquant.console import log
from lrquant.device import module_device, placed, to_device
from lrquant.errors import LrquantError
from lrquant.methods import losses
from lrquant.methods.activations import DTYPES, Activations
from lrquant.methods.capture import batches, capture_block_inputs, capture_block_kwargs, run_block
from lrquant.models.streaming import Stream
from lrquant.quant.apply import (
    attach_block_quantizers,
    attach_head_quantizers,
    quantize_before_blocks,
    use_quantized_attention,
)
from lrquant.quant.gptq import GPTQStatistics, HessianAccumulator
from lrquant.quant.linear import QuantLinear, rotate_input, weights_held
from lrquant.quant.quantizer import compiled_quantizer
from lrquant.recipes import Recipe, use_bf16
from lrquant.transforms.block import (
    SEARCHED_INITS,
    AttentionLayout,
    BlockTransforms,
    ChannelStats,
    TransformOptions,
    active_pairs,
    attach_block_transforms,
    fold_block_transforms,
)


@dataclass
class BlockReport:
    """What happened while one block was learned."""

    index: int
    losses: list[float] = field(default_factory=list)
    # the same per epoch, split into its unweighted terms ("mse", "nlc"), each summed over branches
    terms: dict[str, list[float]] = field(default_factory=dict)
    cosine: float = float("nan")
    mse: float = float("nan")
    seconds: float = 0.0
    retries: int = 0
    lr_scale: float = 1.0
    init: str | None = None  # the initialisation chosen by smoothing="best"


@dataclass
class ChainState:
    """Inputs of the next block on the full-precision and the quantized chains."""

    fp: torch.Tensor
    quant: torch.Tensor


BlockDone = Callable[[int, nn.Module, ChainState, BlockReport], None]


@dataclass
class BlockwiseResult:
    """What the block-wise pass hands on (to the end-to-end step, :mod:`lrquant.methods.e2e`)."""

    # the blocks learned in this call (on a resumed run, those after the saved ones)
    reports: list[BlockReport]
    # the full-precision chain's last hidden states (after the last block and what runs after it),
    # on the learning device
    fp_hidden: torch.Tensor


def transform_options(recipe: Recipe, arch: ArchSpec) -> TransformOptions:
    """The transforms a recipe asks for. Shifts (``auto``) are used where the norm has a bias."""
    shifts = recipe.shifts == "on" or (recipe.shifts == "auto" and arch.norm_kind == "layer")
    if shifts and arch.norm_kind != "layer":
        # An RMSNorm has no bias to fold a shift into (fold_into_norm would fail after training).
        raise LrquantError(
            f"shifts=on needs LayerNorm models (e.g. opt); '{arch.model_types[0]}' uses RMSNorm: "
            "use shifts=auto or shifts=off"
        )
    return TransformOptions(
        smoothing=recipe.smoothing,
        alpha=recipe.alpha,
        shifts=shifts,
        qk_smoothing=recipe.qk_smoothing,
        clipping=recipe.clipping,
        rotation_vectors=recipe.rotation,
        rounding=recipe.rounding,
    )


@dataclass(frozen=True)
class Learner:
    """What every block of one run is learned with."""

    arch: ArchSpec
    config: object  # the model's config (the attention layout)
    scheme: QuantScheme
    recipe: Recipe
    options: TransformOptions
    seed: int = 0
    bits_factor: float = 1.0  # scales the smoothing learning rate (:func:`bits_lr_factor`)
    windows: int = 0  # calibration windows over every process (:mod:`lrquant.distributed`)
    # where the chains live (dtype, memory or files): :mod:`lrquant.methods.activations`
    activations: Activations = field(default_factory=Activations)

    @classmethod
    def of(
        cls, model: nn.Module, arch: ArchSpec, scheme: QuantScheme, recipe: Recipe, seed: int = 0
    ) -> Learner:
        """The learner for ``recipe``; refuses impossible settings before any work."""
        options = transform_options(recipe, arch)
        return cls(arch, arch.config_of(model), scheme, recipe, options, seed, bits_lr_factor(recipe, scheme))


@dataclass
class BlockWork:
    """One block between its stages, as :func:`initialise` set it up."""

    block: nn.Module
    kwargs: dict
    report: BlockReport
    fp_out: torch.Tensor  # the full-precision block's output on the full-precision chain
    targets: list[torch.Tensor]  # what training matches: one per branch that is on
    transforms: BlockTransforms
    learn: bool = False  # a learning recipe, a target and something learnable
    # fake quantization runs through torch.compile (while learning, with ``compile``)
    compiled: bool = False


@torch.no_grad()
def _targets_and_stats(
    block: nn.Module, learner: Learner, state: ChainState, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, ChannelStats]]:
    arch, recipe, acts = learner.arch, learner.recipe, learner.activations
    stats: dict[str, ChannelStats] = {}

    def observe(name: str):
        def hook(_module, args):
            x = args[0].detach().flatten(0, -2).float()
            lo, hi = x.amin(dim=0), x.amax(dim=0)
            if name in stats:
                lo, hi = torch.minimum(stats[name].min, lo), torch.maximum(stats[name].max, hi)
            stats[name] = ChannelStats(lo, hi)

        return hook

    names = sorted({pair.targets[0] for pair in active_pairs(arch, learner.options)})
    handles = [block.get_submodule(n).register_forward_pre_hook(observe(n)) for n in names]
    try:
        fp_out = run_block(block, state.fp, kwargs, recipe.batch_size, acts)
    finally:
        for handle in handles:
            handle.remove()
    for name in names if distributed.world() > 1 else []:  # the ranges over every process's windows
        stats[name] = ChannelStats(
            distributed.reduce_(stats[name].min, "min"), distributed.reduce_(stats[name].max, "max")
        )
    homologous = recipe.homologous and recipe.learn  # a one-shot recipe needs no training targets
    hom_out = run_block(block, state.quant, kwargs, recipe.batch_size, acts) if homologous else None
    return fp_out, hom_out, stats


def _loss(
    out: torch.Tensor, targets: list[torch.Tensor], recipe: Recipe, weighting: losses.DynamicWeighting | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise, and its unweighted terms (comparable across blocks, for the report).

    With dynamic weighting the optimizer sees each term over its own running size, so the plain
    sum of the terms can rise while the weighted loss falls (one term traded for the other).
    """
    terms = {}
    if recipe.mse:
        terms["mse"] = sum(losses.mse(out, t) for t in targets)
    if recipe.nlc:
        terms["nlc"] = sum(losses.nlc(out, t) for t in targets)
    # one device-to-host copy for all terms (this runs on every training step)
    values = dict(zip(terms, torch.stack(list(terms.values())).detach().tolist(), strict=True))
    if weighting is not None and len(terms) == 2:
        return weighting(*terms.values()), values
    return sum(terms.values()), values


def bits_lr_factor(recipe: Recipe, scheme: QuantScheme) -> float:
    """``lr_by_bits``: ``2 ** -(b - 4)`` for the narrowest quantized width ``b`` above 4 bits (weights
    and linear inputs), else 1; it scales the smoothing rate (``lr_transform``) alone."""
    widths = [spec.bits for spec in (*scheme.weight_specs, scheme.activation) if spec.enabled]
    if not recipe.lr_by_bits or not widths:
        return 1.0
    return 2.0 ** -max(0, min(widths) - 4)


def optimizer_for(
    bt: BlockTransforms, recipe: Recipe, lr_scale: float = 1.0, bits_factor: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW over a block's transforms: smoothing, clipping and rounding at their own learning
    rates; ``bits_factor`` (:func:`bits_lr_factor`) scales the smoothing one. The fused update
    (one kernel for all parameters) takes a sixth of the time of the per-parameter loop on CPU."""
    return torch.optim.AdamW(
        [
            {"params": bt.smoothing_parameters(), "lr": recipe.lr_transform * lr_scale * bits_factor},
            {"params": bt.clipping_parameters(), "lr": recipe.lr_clipping * lr_scale},
            {"params": bt.rounding_parameters(), "lr": recipe.lr_rounding * lr_scale},
        ],
        weight_decay=0.0,
        fused=True,
    )


def _training_output(block: nn.Module, inputs: torch.Tensor, kwargs: dict, recipe: Recipe) -> torch.Tensor:
    """The block's float32 output on a training batch (under bf16 autocast where the recipe asks)."""
    with torch.autocast(inputs.device.type, torch.bfloat16, use_bf16(recipe, inputs.device)):
        out = block(inputs, **kwargs)
    return (out[0] if isinstance(out, tuple) else out).float()


def training_step(
    block: nn.Module,
    inputs: torch.Tensor,
    targets: list[torch.Tensor],
    kwargs: dict,
    recipe: Recipe,
    optimizer: torch.optim.Optimizer,
    weighting: losses.DynamicWeighting | None,
) -> dict[str, float] | None:
    """One optimizer step on one batch; returns the unweighted loss terms, or None (and no update)
    if the loss is not finite. Over several processes (:mod:`lrquant.distributed`), ``inputs``
    are this process's windows of the batch (maybe none): see :func:`_shared_step`."""
    if distributed.world() > 1:
        out = _training_output(block, inputs, kwargs, recipe) if inputs.shape[0] else None
        return _shared_step(out, targets, recipe, optimizer, weighting)
    out = _training_output(block, inputs, kwargs, recipe)
    loss, terms = _loss(out, targets, recipe, weighting)
    if not torch.isfinite(loss):
        return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms


def _shared_step(
    out: torch.Tensor | None,
    targets: list[torch.Tensor],
    recipe: Recipe,
    optimizer: torch.optim.Optimizer,
    weighting: losses.DynamicWeighting | None,
) -> dict[str, float] | None:
    """The step of a batch spread over processes, from this process's outputs ``out`` (None
    without windows in the batch): the loss terms and the gradients are summed over the
    processes, so every one takes the step one process would take on the whole batch."""
    terms = _SharedTerms(out, targets, recipe)
    if not all(math.isfinite(v) for v in terms.values.values()):
        return None
    divisors = dict.fromkeys(terms.values, 1.0)
    if weighting is not None and len(terms.values) == 2:
        divisors = dict(zip(terms.values, weighting.divisors(*terms.values.values()), strict=True))
    optimizer.zero_grad(set_to_none=True)
    surrogate = terms.surrogate(divisors)
    if surrogate is not None:
        surrogate.backward()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    distributed.reduce_grads_(parameters)
    optimizer.step()
    return terms.values


@torch.no_grad()
def _plain_loss(
    block: nn.Module, inputs: torch.Tensor, targets: list[torch.Tensor], kwargs: dict, recipe: Recipe
) -> float:
    """The block's loss terms on ``inputs``, summed without dynamic weighting: a score that
    compares states of one block (candidate inits); over every process's share of the windows."""
    with weights_held(block):
        out = run_block(block, inputs, kwargs, recipe.batch_size) if inputs.shape[0] else None
    if distributed.world() > 1:
        return sum(_SharedTerms(out, targets, recipe).values.values())
    return sum(_loss(out, targets, recipe, None)[1].values())


class _SharedTerms:
    """The loss terms of a batch whose windows are spread over processes, from sums that every
    process adds its share to: ``values``, the unweighted terms of the whole batch (as
    :func:`_loss` computes them on one process), and :meth:`surrogate`, this process's part of
    their gradient. ``out`` is None for a process without windows in the batch."""

    def __init__(self, out: torch.Tensor | None, targets: list[torch.Tensor], recipe: Recipe) -> None:
        self.out, self.recipe = out, recipe
        self.sums: list[tuple[torch.Tensor, torch.Tensor]] = []  # per target: squared errors, cosines
        if out is not None:
            for target in targets:
                target = target.float()
                self.sums.append(
                    ((out - target).square().sum(), F.cosine_similarity(out, target, dim=-1).sum())
                )
        count = [out.numel(), out.shape[:-1].numel()] if out is not None else [0, 0]
        local = [float(v.detach()) for pair in self.sums for v in pair] or [0.0] * (2 * len(targets))
        total = distributed.reduce_(torch.tensor(local + count, dtype=torch.float64))
        self.elements, self.tokens = float(total[-2]), float(total[-1])
        self.cosines = [float(total[2 * i + 1]) / self.tokens for i in range(len(targets))]
        mse = sum(float(total[2 * i]) for i in range(len(targets))) / self.elements
        nlc = sum(-math.log(max(abs(c), losses.MIN_COSINE)) for c in self.cosines)
        self.values = {k: v for k, v in (("mse", mse), ("nlc", nlc)) if getattr(recipe, k)}

    def surrogate(self, divisors: dict[str, float]) -> torch.Tensor | None:
        """A loss whose gradient, summed over the processes, is that of the batch's loss with each
        term divided by ``divisors`` (dynamic weighting; 1 without)."""
        if self.out is None:
            return None
        total = self.out.new_zeros(())
        for (squares, cosines), cos in zip(self.sums, self.cosines, strict=True):
            if self.recipe.mse:
                total = total + squares / self.elements / divisors["mse"]
            if self.recipe.nlc and abs(cos) > losses.MIN_COSINE:  # -log|c|: gradient -dc / c
                total = total - cosines / (self.tokens * cos) / divisors["nlc"]
        return total


@torch.no_grad()
def _choose_init(
    block: nn.Module,
    bt: BlockTransforms,
    inputs: torch.Tensor,
    targets: list[torch.Tensor],
    kwargs: dict,
    recipe: Recipe,
) -> str:
    """Try each candidate initialisation of the smoothing scales; keep the one whose quantized
    block has the lowest unweighted loss on the first calibration samples."""
    n = min(recipe.init_samples, inputs.shape[0])
    if distributed.world() > 1:  # this process's windows among the first init_samples of all
        n = min(distributed.owned(recipe.init_samples).numel(), inputs.shape[0])
    scores = {}
    for how in SEARCHED_INITS:
        bt.use_init(how)
        scores[how] = _plain_loss(block, inputs[:n], [t[:n] for t in targets], kwargs, recipe)
    best = min(scores, key=scores.__getitem__)
    bt.use_init(best)
    return best


def _hooked(block: nn.Module, linears: list[QuantLinear], hook, inputs: torch.Tensor, kwargs, recipe) -> None:
    """Run ``block`` on ``inputs`` with ``hook`` as a forward pre-hook on each of ``linears``
    (the transforms unchanged: each weight is quantized once for the whole pass)."""
    handles = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        with weights_held(block):
            for x in batches(inputs, recipe.batch_size, module_device(block)):
                block(x, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------ the stages


def initialise(
    learner: Learner, block: nn.Module, name: str, kwargs: dict, state: ChainState, report: BlockReport
) -> BlockWork:
    """Stage 1: the full-precision targets and the input statistics, then the block's quantizers
    and learnable transforms (smoothing initialised from the statistics); with
    ``smoothing="best"``, the initialisation whose quantized block scores best
    (:func:`_choose_init`, recorded in ``report.init``). ``name`` is the block's path in the model."""
    recipe, arch = learner.recipe, learner.arch
    for p in block.parameters():
        p.requires_grad_(False)
    fp_out, hom_out, stats = _targets_and_stats(block, learner, state, kwargs)
    attach_block_quantizers(block, arch, learner.scheme, prefix=name)
    layout = AttentionLayout.of_block(block, arch, learner.config)
    bt = attach_block_transforms(block, arch, layout, stats, learner.options)
    branches = ((fp_out, recipe.error_propagation), (hom_out, recipe.homologous))
    targets = [target for target, on in branches if on]
    learnable = bt.smoothing_parameters() or bt.clipping_parameters() or bt.rounding_parameters()
    learn = bool(recipe.learn and targets and learnable)
    work = BlockWork(block, kwargs, report, fp_out, targets, bt, learn, learn and recipe.compile)
    if bt.inits and targets:
        with compiled_quantizer(work.compiled):  # scored with the quantizer training will use
            report.init = _choose_init(block, bt, state.quant, targets, kwargs, recipe)
    return work


@torch.no_grad()
def search_clipping(learner: Learner, work: BlockWork, state: ChainState) -> None:
    """Stage 2 (``clip_init="search"``): start every linear's clipping bounds at the shrink
    factors that :meth:`LearnableClipping.search` picks, weighting each input channel by its mean
    square over the calibration inputs as that linear sees them (after the chosen smoothing)."""
    block = work.block
    clipped = [
        m
        for m in block.modules()
        if isinstance(m, QuantLinear) and m.transform is not None and m.transform.clipping is not None
    ]
    square_sums: dict[QuantLinear, torch.Tensor] = {}
    tokens: dict[QuantLinear, int] = {}

    def observe(module, args):
        # the weight sees the input after its run-time Hadamard rotation (if any)
        x = rotate_input(args[0].detach().flatten(0, -2).float(), module.input_rotation)
        square_sums[module] = square_sums.get(module, 0.0) + x.square().sum(dim=0)
        tokens[module] = tokens.get(module, 0) + x.shape[0]

    # Mean squares need no more precision than bf16 gives: the pass runs as training's forward does.
    device = module_device(block)
    with torch.autocast(device.type, torch.bfloat16, use_bf16(learner.recipe, device)):
        _hooked(block, clipped, observe, state.quant, work.kwargs, learner.recipe)
    for module in clipped if distributed.world() > 1 else []:  # over every process's windows
        distributed.reduce_(square_sums[module])
        tokens[module] = int(distributed.reduce_(torch.tensor([tokens[module]], dtype=torch.float64))[0])
    for module in clipped:
        weight = module.transform.transformed(module.weight, module.bias)[0]
        module.transform.clipping.search(weight, module.weight_spec, square_sums[module] / tokens[module])


def train(learner: Learner, work: BlockWork, state: ChainState, bar: tqdm | None = None) -> None:
    """Stage 3: train the block's transforms (AdamW, :func:`optimizer_for`) for ``epochs`` passes
    over the quantized chain's inputs in a seeded order, so the quantized block matches the
    targets. A non-finite loss restarts from the initial transforms at half the learning rate, up
    to ``max_retries`` times; if every try diverges the initial transforms stay. The losses and
    tries go to the block's report."""
    block, bt, targets, kwargs, report = work.block, work.transforms, work.targets, work.kwargs, work.report
    recipe, bits_factor = learner.recipe, learner.bits_factor
    seed = learner.seed * 1000 + report.index
    initial = copy.deepcopy(bt.state_dict())
    device = module_device(block)
    n = learner.windows or state.quant.shape[0]  # every process's windows (:mod:`lrquant.distributed`)
    mine = {int(g): i for i, g in enumerate(distributed.owned(n))} if distributed.world() > 1 else None
    for attempt in range(recipe.max_retries + 1):
        lr_scale = 0.5**attempt
        bt.load_state_dict(initial)
        optimizer = optimizer_for(bt, recipe, lr_scale, bits_factor)
        steps = math.ceil(n / recipe.batch_size)
        weighting = losses.DynamicWeighting(2) if recipe.dynamic_weighting else None
        generator = torch.Generator().manual_seed(seed)
        report.losses, report.terms = [], {}
        finite = True
        for epoch in range(recipe.epochs):
            totals: dict[str, float] = {}
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, recipe.batch_size):
                idx = order[start : start + recipe.batch_size]
                if mine is not None:  # the windows of the batch that this process holds
                    idx = torch.tensor([mine[int(g)] for g in idx if int(g) in mine], dtype=torch.long)
                inputs, shares = _batch(state.quant, idx, device), [_batch(t, idx, device) for t in targets]
                terms = training_step(block, inputs, shares, kwargs, recipe, optimizer, weighting)
                if terms is None:
                    finite = False
                    break
                bt.project_()
                for name, value in terms.items():
                    totals[name] = totals.get(name, 0.0) + value
            if not finite:
                break
            report.losses.append(sum(totals.values()) / steps)
            for name, value in totals.items():
                report.terms.setdefault(name, []).append(value / steps)
            if bar is not None:
                bar.set_postfix(block=report.index, epoch=epoch + 1, loss=f"{report.losses[-1]:.4g}")
        if finite:
            report.retries, report.lr_scale = attempt, lr_scale
            return
    # Every retry diverged: keep the initial transforms (smoothing init, no clipping learned).
    bt.load_state_dict(initial)
    report.retries, report.lr_scale = recipe.max_retries + 1, 0.0


@torch.no_grad()
def collect_statistics(learner: Learner, work: BlockWork, state: ChainState) -> GPTQStatistics:
    """Stage 4 (``gptq``): every quantized linear's input Hessian, the mean ``x xᵀ`` of its inputs
    as the block sees them on the quantized chain (rotated and quantized as its forward does), for
    GPTQ to round against at the fold: all from one pass of the block as training left it
    (round-to-nearest weights)."""
    linears = {
        name: m
        for name, m in work.block.named_modules()
        if isinstance(m, QuantLinear) and m.transform is not None
    }
    acc = {m: HessianAccumulator() for m in linears.values()}

    def observe(module, args):
        acc[module].add(module.quantized_input(args[0].float()))

    _hooked(work.block, list(acc), observe, state.quant, work.kwargs, learner.recipe)
    for m in linears.values() if distributed.world() > 1 else []:  # over every process's windows
        distributed.reduce_(acc[m].sum)
        acc[m].tokens = int(distributed.reduce_(torch.tensor([acc[m].tokens], dtype=torch.float64))[0])
    hessians = {name: acc[m].hessian() for name, m in linears.items()}
    return GPTQStatistics(hessians, learner.recipe.gptq_damp)


@torch.no_grad()
def fold(
    learner: Learner, work: BlockWork, state: ChainState, gptq: GPTQStatistics | None = None
) -> ChainState:
    """Stage 5: fold the transforms into the block's weights and quantize them for good (to
    nearest, or by GPTQ against ``gptq``), then run the finished block on the quantized chain.
    Records in the report how close its output is to the full-precision block's; returns both
    chains' outputs."""
    fold_block_transforms(work.block, learner.arch, gptq)  # also freezes every linear's quantized weight
    recipe = learner.recipe
    quant_out = run_block(work.block, state.quant, work.kwargs, recipe.batch_size, learner.activations)
    if distributed.world() > 1:  # over every process's windows
        shared = _SharedTerms(quant_out.float(), [work.fp_out], recipe.model_copy(update={"mse": True}))
        work.report.cosine, work.report.mse = shared.cosines[0], shared.values["mse"]
    else:
        work.report.cosine, work.report.mse = _closeness(quant_out, work.fp_out)
    return ChainState(fp=work.fp_out, quant=quant_out)


def _closeness(out: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Mean token cosine and mean squared error of two stored chains, one window at a time (a
    chain kept in bf16 or in a file is never copied whole to float32)."""
    cosines, squares = 0.0, 0.0
    for window in range(out.shape[0]):
        a, b = out[window].float(), target[window].float()
        cosines += float(F.cosine_similarity(a, b, dim=-1).sum())
        squares += float((a - b).square().sum())
    return cosines / out.shape[:-1].numel(), squares / out.numel()


# -------------------------------------------------------------------------------------- the loop


def quantize_blockwise(
    model: nn.Module,
    arch: ArchSpec,
    scheme: QuantScheme,
    recipe: Recipe,
    calibration: torch.Tensor,
    seed: int = 0,
    start: tuple[int, ChainState] | None = None,
    on_block_done: BlockDone | None = None,
    device: torch.device | None = None,
    stream: Stream | None = None,
    activations: Activations | None = None,
) -> BlockwiseResult:
    """Quantize every block of ``model`` in place with ``recipe``; returns the per-block reports
    and the full-precision chain's last hidden states (which the end-to-end step,
    :func:`lrquant.methods.e2e.run_end_to_end`, needs; it is not run here).

    ``start`` resumes at a block with the chain inputs saved when the previous one finished
    (blocks before it must already hold their finished weights; all of them, on a run that
    finished every block). ``on_block_done`` is called after each block (back in host memory),
    e.g. to checkpoint it. The model stays on the CPU; each block is learned on ``device``
    (default: the CPU) with both chains kept there. With ``stream`` (a streamed model), each
    block is loaded when its turn comes and dropped after ``on_block_done`` (which must keep it).
    ``activations`` says how the chains are stored (default: in memory on ``device``, in the
    recipe's ``chain_dtype``).
    """
    device = device or torch.device("cpu")
    learner = Learner.of(model, arch, scheme, recipe, seed)  # refuses impossible settings before any work
    windows = calibration.shape[0]
    acts = activations or Activations(DTYPES[recipe.chain_dtype], device)
    learner = replace(learner, windows=windows, activations=acts)
    block_names, blocks = zip(*arch.named_blocks(model), strict=True)
    transitions = arch.transitions(model)
    kwargs_per_block, transition_kwargs = to_device(capture_block_kwargs(model, arch, calibration[0]), device)
    share = distributed.owned(windows) if distributed.world() > 1 else None  # this process's windows
    if share is not None:
        calibration = calibration[share]
    if start is None:
        first = 0
        inputs = capture_block_inputs(model, arch, calibration, acts)
        if scheme.patch_embed or scheme.projector:  # the quantized chain starts from them quantized
            quantize_before_blocks(model, arch, scheme)
            state = ChainState(fp=inputs, quant=capture_block_inputs(model, arch, calibration, acts))
        else:
            state = ChainState(fp=inputs, quant=acts.keep(inputs))
    else:
        first, state = start
        if share is not None:
            state = ChainState(fp=state.fp[share], quant=state.quant[share])
        quantize_before_blocks(model, arch, scheme)  # a resumed run starts from the loaded model
        state = ChainState(fp=acts.keep(state.fp), quant=acts.keep(state.quant))
    log(acts.words())
    # The head (when asked for) runs after every block, so rounding it first changes no target;
    # first, so that a head that cannot be quantized stops the run before any training.
    attach_head_quantizers(model, arch, scheme)
    use_quantized_attention(model)
    reports = []
    run_start = time.perf_counter()
    bar = tqdm(total=len(blocks), initial=first, desc="blocks", unit="block", disable=None)
    for index in range(first, len(blocks)):
        began = time.perf_counter()
        report = BlockReport(index)
        host = stream.load(index) if stream is not None else blocks[index]
        with placed(host, device) as block:  # back in host memory afterwards, also on errors
            work = initialise(learner, block, block_names[index], kwargs_per_block[index], state, report)
            # Folding and the quantized chain use the same (compiled or eager) quantizer as training,
            # so the finished block computes what the last training step computed.
            with compiled_quantizer(work.compiled):
                if work.learn and recipe.clip_init == "search" and work.transforms.clipping:
                    search_clipping(learner, work, state)
                if work.learn:
                    train(learner, work, state, bar)
                gptq = None
                if recipe.gptq and scheme.weight.enabled:  # GPTQ rounds the folded weights
                    gptq = collect_statistics(learner, work, state)
                state = fold(learner, work, state, gptq)
        if index in transitions:  # e.g. Swin's patch merging, kept in full precision
            with placed(transitions[index], device):
                state = _through(transitions[index], state, transition_kwargs[index], recipe.batch_size, acts)
        _check_finite(state, index)
        report.seconds = round(time.perf_counter() - began, 2)
        reports.append(report)
        if on_block_done is not None:
            whole = state  # every process's windows, in order (the store keeps all of them)
            if share is not None:
                whole = ChainState(*(distributed.gather_windows(t, windows) for t in (state.fp, state.quant)))
            on_block_done(index, host, whole, report)
        if stream is not None:
            stream.release(index)
        bar.update(1)
        bar.set_postfix(block=index, cos=f"{report.cosine:.4f}")
        _log_block(report, len(blocks), time.perf_counter() - run_start, index - first + 1)
    bar.close()
    return BlockwiseResult(reports, state.fp)


def _check_finite(state: ChainState, index: int) -> None:
    """Stop, in one line, before a block whose outputs hold NaN or infinity is kept: every later
    block would learn on them and the output would be a broken model."""
    for chain, whose in ((state.fp, "the full-precision model"), (state.quant, "the quantized model")):
        if not bool(torch.isfinite(chain).all()):
            advice = (
                "check the model's weights and the calibration data"
                if chain is state.fp
                else "rerun with --set compile=false; if that fails too, with a smaller learning rate "
                "(--set lr_transform=..., lr_clipping=...)"
            )
            raise LrquantError(
                f"block {index + 1} of {whose} gives non-finite outputs (NaN or infinity) on the "
                f"calibration windows; the run stops rather than write a broken model: {advice}"
            )


def _batch(chain: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Windows ``idx`` of a stored chain, as float32 on ``device``."""
    return chain[idx].to(device=device, dtype=torch.float32)


@torch.no_grad()
def _through(
    module: nn.Module, state: ChainState, kwargs: dict, batch_size: int, acts: Activations
) -> ChainState:
    """Both chains through a full-precision module that runs between two blocks."""
    return ChainState(
        fp=run_block(module, state.fp, kwargs, batch_size, acts),
        quant=run_block(module, state.quant, kwargs, batch_size, acts),
    )


def _log_block(report: BlockReport, total: int, elapsed: float, done_now: int) -> None:
    left = elapsed / done_now * (total - report.index - 1)
    loss = f", loss {report.losses[0]:.4g} -> {report.losses[-1]:.4g}" if report.losses else ""
    if len(report.terms) > 1:  # which term moved which way
        loss += " (" + ", ".join(f"{k} {v[0]:.4g} -> {v[-1]:.4g}" for k, v in report.terms.items()) + ")"
    retry = f", {report.retries} retries (lr x{report.lr_scale:g})" if report.retries else ""
    retry += f", init {report.init}" if report.init else ""
    log(
        f"block {report.index + 1}/{total}: cosine {report.cosine:.5f}{loss}{retry}, "
        f"{report.seconds:.1f} s, about {left / 60:.1f} min left"
    )


def report_dict(report: BlockReport) -> dict:
    """A JSON-friendly view of a block report."""
    return asdict(report)
