"""End-to-end tuning of the weight step sizes after the block-wise pass (optional).

Block-wise learning matches each block to its full-precision twin; errors that only show in
the model's output are never seen. Here every quantized weight keeps its integer codes and its
zero point, and only each group's step size is multiplied by a learned factor ``α`` (starting
at 1), trained for ``e2e_epochs`` over the calibration samples on the KL divergence from the
full-precision model's next-token distribution to the quantized model's (for an image model: on
the relative squared error of its features: the last hidden states through the model's final
norm, affine part included). ``(q - z)·Δ·α`` is again
a point of an affine grid, so the saved weights stay on a per-group grid any packed format
takes. This is the E2E-QP step of EfficientQAT (Chen et al., 2024, "EfficientQAT: Efficient
Quantization-Aware Training for Large Language Models"), here with a distillation target instead
of the labels, as calibration sets are small.

Options: ``e2e_samples`` trains on more windows than the block-wise pass (their full-precision
targets come from one forward of the full-precision model each, before anything is quantized),
and ``e2e_schedule="cosine"`` decays the learning rate to 0 over the steps.

:func:`lrquant.api.apply_method` runs this step through :func:`run_end_to_end` after
:func:`lrquant.methods.blockwise.quantize_blockwise`, whose result holds the full-precision
chain's last hidden states it needs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from lrquant.arch import ArchSpec
from lrquant.config import QuantScheme, QuantSpec
from lrquant.console import log
from lrquant.data import samples
from lrquant.device import placed
from lrquant.methods.resume import ResumeStore
from lrquant.modalities import LastHidden, modality_of
from lrquant.models.streaming import Stream
from lrquant.quant.apply import attach_block_quantizers, replace_module
from lrquant.quant.gptq import WeightRounding
from lrquant.quant.linear import QuantLinear
from lrquant.quant.quantizer import group_for_stats, ungroup
from lrquant.recipes import Recipe, use_bf16


class StepScale(nn.Module):
    """Multiplies each statistics group of a frozen quantized weight by a learnable factor.

    Takes the place of a :class:`~lrquant.transforms.weight.WeightTransform` on a
    :class:`QuantLinear` (same ``weight_and_bias`` / ``final_weight_and_bias`` interface), so
    folding it writes the rescaled weight (its integer codes unchanged: nothing is rounded again).
    """

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, device: torch.device | None = None) -> None:
        """Factors for ``weight``'s groups, on ``device`` (default: the weight's; a weightless
        block's weight gives their shape only)."""
        super().__init__()
        grouped = group_for_stats(weight.detach(), spec)[0]
        self.alpha = nn.Parameter(torch.ones(grouped.shape[:-1] + (1,), device=device or weight.device))

    def weight_and_bias(
        self, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        grouped, pad = group_for_stats(weight.float(), spec)
        return ungroup(grouped * self.alpha, weight, pad), bias

    def final_weight_and_bias(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: QuantSpec,
        round_weight: WeightRounding | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What folding writes: :meth:`weight_and_bias`."""
        if round_weight is not None:
            raise ValueError("end-to-end step sizes keep every weight's integer code: nothing to round")
        return self.weight_and_bias(weight, bias, spec)

    def final_grid(
        self, weight: torch.Tensor, spec: QuantSpec, current: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded weight's grid: the block-wise grid with each step times its factor."""
        if current is None:
            raise ValueError("end-to-end step sizes need the block-wise grid of the weight")
        scale, zero = current
        return scale * self.alpha.detach().reshape(scale.shape), zero


@torch.no_grad()
def fp_final_hidden(
    model: nn.Module, arch: ArchSpec, samples: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The full-precision model's last hidden states (the last block's outputs, which the final
    norm reads) for ``samples``, one at a time; call before anything is quantized. Returned in
    host memory."""
    modality = modality_of(arch)
    modality.check_end_to_end(model, arch)
    captured: list[torch.Tensor] = []
    with LastHidden(model, arch) as last:
        for sample in samples:
            model(**modality.model_inputs(sample.to(device)))
            captured.append(last.value.detach().cpu())
    return torch.cat(captured)


def end_to_end_wanted(recipe: Recipe, scheme: QuantScheme) -> bool:
    """Whether a run has an end-to-end step: ``e2e_epochs`` and quantized weights."""
    return bool(recipe.e2e_epochs and scheme.weight.enabled)


def check_supported(model: nn.Module, arch: ArchSpec) -> None:
    """Refuse, before any work, a model whose end-to-end loss cannot be computed here (a language
    model needs its final norm and head; image models are tuned on their last hidden states)."""
    modality_of(arch).check_end_to_end(model, arch)


def tune_step_sizes(
    model: nn.Module,
    arch: ArchSpec,
    calibration: torch.Tensor,
    fp_hidden: torch.Tensor,
    recipe: Recipe,
    seed: int,
    device: torch.device,
) -> list[float]:
    """Train every quantized block linear's step factors end to end, then fold them; returns the
    mean KL (image models: feature error) per epoch. ``fp_hidden`` are the full-precision model's
    last hidden states for the ``calibration`` samples. The model must already sit on ``device``."""
    modality_of(arch).check_end_to_end(model, arch)
    linears = [
        m
        for block in arch.block_list(model)
        for m in block.modules()
        if isinstance(m, QuantLinear) and m.weight_spec.enabled
    ]
    model.requires_grad_(False)  # only the step factors learn
    for module in linears:
        module.transform = StepScale(module.weight, module.weight_spec)
    params = [module.transform.alpha for module in linears]
    losses = _train(model, arch, params, calibration, fp_hidden, recipe, seed, device)
    with torch.no_grad():
        for module in linears:
            module.fold_transform()
    return losses


def _train(
    model: nn.Module,
    arch: ArchSpec,
    params: list[nn.Parameter],
    calibration: torch.Tensor,
    fp_hidden: torch.Tensor,
    recipe: Recipe,
    seed: int,
    device: torch.device,
) -> list[float]:
    """The step factors ``params`` trained on the end-to-end loss; back at 1 after a non-finite
    loss. Returns the mean loss per epoch."""
    modality = modality_of(arch)
    norm = modality.end_to_end_norm(model, arch)
    optimizer = torch.optim.AdamW(params, lr=recipe.lr_e2e, weight_decay=0.0, fused=True)
    steps_in_all = recipe.e2e_epochs * calibration.shape[0]
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_in_all)
        if recipe.e2e_schedule == "cosine"
        else None
    )
    generator = torch.Generator().manual_seed(seed)
    bf16 = use_bf16(recipe, device)

    def autocast():
        return torch.autocast(device.type, torch.bfloat16, bf16)

    losses: list[float] = []
    try:
        for epoch in range(recipe.e2e_epochs):
            total, steps = 0.0, 0
            for i in torch.randperm(calibration.shape[0], generator=generator).tolist():
                inputs = modality.model_inputs(calibration[i].to(device))
                target = fp_hidden[i : i + 1].to(device=device, dtype=torch.float32)  # a stored chain
                loss = modality.end_to_end_loss(model, arch, inputs, target, norm, autocast)
                if not torch.isfinite(loss):
                    raise FloatingPointError
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                total, steps = total + loss.item(), steps + 1
            losses.append(total / steps)
            log(
                f"end-to-end step sizes, epoch {epoch + 1}/{recipe.e2e_epochs}: "
                f"{modality.e2e_measure} {losses[-1]:.4g}"
            )
    except FloatingPointError:
        log("end-to-end step sizes: non-finite loss, keeping the block-wise step sizes")
        for alpha in params:
            alpha.data.fill_(1.0)
    return losses


class _Recomputed(nn.Module):
    """Takes the place of block ``index`` of a streamed model while the step factors train: loads
    the finished block from the resume store for its forward, and again for its backward
    (activation checkpointing), so no block stays in memory between the two."""

    def __init__(self, load, index: int) -> None:
        super().__init__()
        self.load, self.index = load, index

    def forward(self, hidden, *args, **kwargs):
        return checkpoint(self._run, hidden, *args, use_reentrant=False, **kwargs)

    def _run(self, hidden, *args, **kwargs):
        return self.load(self.index)(hidden, *args, **kwargs)


def tune_step_sizes_streamed(
    stream: Stream,
    store: ResumeStore,
    scheme: QuantScheme,
    calibration: torch.Tensor,
    fp_hidden: torch.Tensor,
    recipe: Recipe,
    seed: int,
) -> list[float]:
    """:func:`tune_step_sizes` for a streamed model (:mod:`lrquant.models.streaming`), on the CPU:
    each finished block is read from the resume ``store`` when the forward reaches it and again
    when the backward does, with its step factors, which alone stay in memory; the folded blocks
    go to the store's end-to-end files (:meth:`ResumeStore.save_folded`). The same steps, losses
    and folded weights as :func:`tune_step_sizes` on the model held whole."""
    model, arch = stream.model, stream.arch
    modality_of(arch).check_end_to_end(model, arch)
    stream.load_lazy()  # the head
    model.requires_grad_(False)
    cpu = torch.device("cpu")
    scales: list[dict[str, StepScale]] = []
    for index in range(len(stream)):  # the step factors, shaped from the weightless blocks
        block = stream.fresh(index)
        attach_block_quantizers(block, arch, scheme, weights_on_grid=True, prefix=stream.names[index])
        scales.append(
            {
                name: StepScale(m.weight, m.weight_spec, cpu)
                for name, m in block.named_modules()
                if isinstance(m, QuantLinear) and m.weight_spec.enabled
            }
        )

    def load(index: int) -> nn.Module:
        """Finished block ``index`` with its step factors, from the store."""
        block = stream.weightless(index)
        store.restore_block(index, block, arch, scheme, stream.names[index])
        block.requires_grad_(False)
        for name, scale in scales[index].items():
            block.get_submodule(name).transform = scale
        return block

    store.clear_folded()
    params = [scale.alpha for block in scales for scale in block.values()]
    try:
        for index, name in enumerate(stream.names):
            replace_module(model, name, _Recomputed(load, index))
        losses = _train(model, arch, params, calibration, fp_hidden, recipe, seed, cpu)
    finally:
        for index in range(len(stream)):
            stream.release(index)
    with torch.no_grad():
        for index in range(len(stream)):
            block = load(index)
            for name in scales[index]:
                block.get_submodule(name).fold_transform()
            store.save_folded(index, block)
    store.finish_folded()
    return losses


def run_end_to_end(
    model: nn.Module,
    arch: ArchSpec,
    recipe: Recipe,
    calibration: torch.Tensor,
    fp_hidden: torch.Tensor,
    seed: int = 0,
    device: torch.device | None = None,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    streamed: tuple[Stream, ResumeStore, QuantScheme] | None = None,
) -> list[float]:
    """The end-to-end step after the block-wise pass: :func:`tune_step_sizes` on the first
    ``e2e_samples`` windows (all of ``calibration`` when 0), with ``model`` on ``device`` (default:
    the CPU) meanwhile; returns the KL (image models: feature error) per epoch.

    ``calibration`` are the block-wise pass's windows and ``fp_hidden`` its full-precision chain's
    last hidden states for them (:attr:`lrquant.methods.blockwise.BlockwiseResult.fp_hidden`);
    ``extra`` holds the windows after them that this step also trains on (``e2e_samples``) and
    the full-precision model's last hidden states for those (:func:`fp_final_hidden`).
    ``streamed``: a streamed model's stream, the resume store its finished blocks are in and its
    scheme (:func:`tune_step_sizes_streamed`, on the CPU).
    """
    device = device or torch.device("cpu")
    windows, hidden = calibration, fp_hidden
    if extra is not None:
        extra_hidden = extra[1].to(device=hidden.device, dtype=hidden.dtype)
        windows, hidden = samples.cat([windows, extra[0]]), torch.cat([hidden, extra_hidden])
    n = recipe.e2e_samples or calibration.shape[0]
    if streamed is not None:
        stream, store, scheme = streamed
        return tune_step_sizes_streamed(stream, store, scheme, windows[:n], hidden[:n], recipe, seed)
    with placed(model, device):
        return tune_step_sizes(model, arch, windows[:n], hidden[:n], recipe, seed, device)
