"""What a run will cost, said before it starts: peak memory and seconds per block.

A model of the arithmetic, not a measurement of this run: the block's linears and attention
give the floating-point operations of one forward pass over the calibration tokens; training
runs ``epochs`` forward and backward passes, the other stages one forward pass each (targets,
the clipping search, GPTQ's statistics, the fold), GPTQ its factorisations and its column loop
(timed on its own: elementwise work). A matrix product timed on the device for a fraction of a
second turns operations into seconds, at the share of that speed the learner reaches
(:data:`TRAIN_EFFICIENCY`, :data:`PASS_EFFICIENCY`, measured on this project's CPUs:
docs/results.md, "What a run costs"). Memory is the process itself and the model (all of it, or
one block when streamed) with, while the blocks learn, the calibration chains and what learning
holds, or, outside them, a window's logits: whichever is more.
The report puts the estimate beside what was measured.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from lrquant.arch import ArchSpec
from lrquant.config import QuantScheme
from lrquant.methods.activations import AT_ONCE, DTYPES, memory_budget, spills
from lrquant.quant.apply import head_linears
from lrquant.recipes import Recipe, use_bf16

# shares of the timed matrix product's speed that the learner reaches: training steps (forward,
# backward and the fake quantizers; fitted to LRQuant+ at the 1B, 3B and 8B shapes) and passes
# without gradients
TRAIN_EFFICIENCY = 0.35
PASS_EFFICIENCY = 0.5
PROCESS_MB = 450.0  # Python, PyTorch and transformers, before any model
COMPILE_S = 15.0  # compiling the fake quantizer, once per run (measured on the 2-core CPU)
# seconds per byte of a block's float32 weights: rounding them to nearest (elementwise passes),
# and, streamed, reading them from the checkpoint and writing them to the resume store
ROUND_S_PER_BYTE = 2.5e-9
STREAM_S_PER_BYTE = 7e-9
# a window's logits while scoring: the model's and the reference's, and one made inside the head
# (the vocabulary-wide temporaries are scored 128 positions at a time)
LOGITS_COPIES = 3
# float32 copies of a block's weights that training holds beside the block itself: the
# transformed and the fake-quantized weights and what autograd keeps of them for the backward
# (fitted to the streamed LRQuant+ runs: 2.5 copies unaccounted for at the 1B shape, 3.6 at 3B)
TRAIN_WEIGHT_COPIES = 3
# the end-to-end step: the share of the matrix product's speed its steps reach, seconds per byte
# of a block read back from the resume store (mostly from the page cache), and the
# vocabulary-wide copies of a window's logits it holds (the model's, their log-softmax, the
# target's, the KL terms and their gradients); fitted to SmolLM2-135M (in memory and streamed)
# and the 1B shape cut to 2 blocks (streamed): docs/results.md, "The cost model"
E2E_EFFICIENCY = 0.5
READ_S_PER_BYTE = 2.5e-10
E2E_LOGITS_COPIES = 8


@dataclass(frozen=True)
class Estimate:
    """A run's cost, before it starts."""

    peak_memory_mb: float
    seconds_per_block: float
    blocks: int
    gflop_per_second: float  # the timed matrix product's speed
    once_seconds: float = 0.0  # compiling, once
    e2e_seconds: float = 0.0  # the end-to-end step, after the blocks

    @property
    def seconds(self) -> float:
        return self.seconds_per_block * self.blocks + self.once_seconds + self.e2e_seconds

    def as_dict(self) -> dict:
        return {**{k: round(v, 2) for k, v in asdict(self).items()}, "seconds": round(self.seconds, 1)}

    def words(self) -> str:
        step = f", then {self.e2e_seconds / 60:.1f} min of end-to-end step" if self.e2e_seconds else ""
        return (
            f"about {self.peak_memory_mb / 1024:.1f} GiB at most and {self.seconds_per_block:.1f} s per "
            f"block{step} ({self.seconds / 60:.1f} min in all for {self.blocks} blocks)"
        )


def _linears(block: nn.Module) -> list[nn.Linear]:
    return [m for m in block.modules() if isinstance(m, nn.Linear)]


def estimate(
    model: nn.Module,
    arch: ArchSpec,
    scheme: QuantScheme,
    recipe: Recipe | None,
    windows: int,
    tokens: int,
    device: torch.device,
    streamed: bool = False,
    processes: int = 1,
    evaluate: bool = False,
    max_memory: int | None = None,
) -> Estimate:
    """The cost of quantizing ``model`` with ``recipe`` (None: round to nearest) on ``windows``
    calibration windows of ``tokens`` tokens each, learning on ``device``; a streamed model
    holds one block at a time; ``processes`` share the windows; ``evaluate``: the evaluation
    before and after too (a language model's); ``max_memory``: the calibration chains' memory
    budget (:mod:`lrquant.methods.activations`; past it they live in files, not counted)."""
    blocks = arch.block_list(model)
    linears = _linears(blocks[0])
    block_params = sum(m.weight.numel() for m in linears)
    config = arch.config_of(model)
    hidden = getattr(config, "hidden_size", linears[0].in_features)
    widest = max(linears, key=lambda m: m.weight.numel())
    intermediate = max(m.out_features for m in linears)

    def activations(count: int) -> int:
        """Bytes of what a block's backward keeps for ``count`` tokens."""
        return 4 * count * (12 * hidden + 6 * intermediate)

    local = -(-windows // processes)
    total_tokens = local * tokens
    # forward operations of one block over this process's calibration tokens
    forward = 2 * block_params * total_tokens + 4 * total_tokens * tokens * hidden
    rate = _matmul_rate(min(tokens, 512), widest.in_features, widest.out_features, device, recipe)
    seconds = 4 * block_params * (ROUND_S_PER_BYTE + (STREAM_S_PER_BYTE if streamed else 0.0))
    if recipe is not None:
        passes = 2 + int(recipe.homologous and recipe.learn) + int(recipe.clip_init == "search")
        passes += int(recipe.gptq)
        seconds += passes * forward / (rate * PASS_EFFICIENCY)
        if recipe.learn:
            seconds += recipe.epochs * 3 * forward / (rate * TRAIN_EFFICIENCY)
        if recipe.gptq:
            factorise = sum(2 * m.in_features**3 + 2 * m.in_features**2 * m.out_features for m in linears)
            seconds += factorise / rate + block_params * _gptq_column_seconds(widest.out_features, device)
    all_params = sum(p.numel() for p in model.parameters())
    blocks_params = sum(p.numel() for b in blocks for p in b.parameters())
    weights = 4 * ((all_params - blocks_params + 2 * blocks_params / len(blocks)) if streamed else all_params)
    # a streamed model's untied head stays on disk while the blocks learn, and the save reads it
    # only after writing the embedding: they are never in memory together
    untied = 0
    if streamed:
        embedding = model.get_input_embeddings().weight
        heads = [head for _, head in head_linears(model, arch)]
        untied = 4 * sum(head.weight.numel() for head in heads if head.weight is not embedding)
    held = weights - untied
    vocab = getattr(config, "vocab_size", 0) or 0
    # outside the blocks: a window's logits (recording what each block is called with), the save
    around = PROCESS_MB * 2**20 + held + 2 * 4 * tokens * vocab
    memory = PROCESS_MB * 2**20 + held
    if recipe is not None:
        chains = AT_ONCE * DTYPES[recipe.chain_dtype].itemsize * total_tokens * hidden
        if not spills(chains, memory_budget(max_memory)):  # else in memory-mapped files
            memory += chains
        if recipe.learn:
            memory += activations(recipe.batch_size * tokens) + TRAIN_WEIGHT_COPIES * 4 * block_params
        if recipe.rounding:  # a learned offset per weight, its gradient and two Adam moments
            memory += 4 * 4 * block_params
        if recipe.gptq:  # the widest input's Hessian, its reordered copy and inverse factor
            memory += 3 * 4 * max(m.in_features for m in linears) ** 2
    memory = max(memory, around)
    if evaluate:  # the full-precision model beside the quantized one, and a window's logits
        memory = max(memory, PROCESS_MB * 2**20 + 2 * weights + LOGITS_COPIES * 4 * tokens * vocab)
    once = (
        COMPILE_S if recipe is not None and recipe.learn and recipe.compile and device.type == "cpu" else 0.0
    )
    e2e_seconds = 0.0
    if recipe is not None and recipe.e2e_epochs and scheme.weight.enabled:
        steps = recipe.e2e_epochs * (recipe.e2e_samples or windows)
        # one window through every block: forward and backward (the step factors need the weights'
        # gradients), streamed the forward again for the backward, every block read from the store
        # twice; the head: forward, backward to its input, and the full-precision target's
        through = len(blocks) * (2 * block_params * tokens + 4 * tokens * tokens * hidden)
        flops = (3 + int(streamed)) * through + 3 * 2 * tokens * hidden * vocab
        reads = 2 * len(blocks) * 4 * block_params * READ_S_PER_BYTE if streamed else 0.0
        e2e_seconds = steps * (flops / (rate * E2E_EFFICIENCY) + reads)
        acts = activations(tokens)
        kept = acts + 4 * tokens * hidden * len(blocks) if streamed else acts * len(blocks)
        # the whole model or, streamed, what is outside the blocks (the head read now) and a block
        e2e_memory = PROCESS_MB * 2**20 + weights + kept + E2E_LOGITS_COPIES * 4 * tokens * vocab
        memory = max(memory, e2e_memory)
    return Estimate(memory / 2**20, seconds, len(blocks), rate / 1e9, once, e2e_seconds)


def _gptq_column_seconds(rows: int, device: torch.device) -> float:
    """Seconds per weight of GPTQ's column-by-column rounding (each column rounded, its error
    spread over the rest of its 128-column block: elementwise work far below the matrix
    product's speed), timed on 256 columns of ``rows`` rows (at most 4096)."""
    from lrquant.config import QuantSpec
    from lrquant.quant.gptq import gptq_quantize

    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128)
    rows, columns = min(rows, 4096), 256
    weight = torch.randn(rows, columns, device=device)
    hessian = torch.eye(columns, device=device) + 0.01
    scale, zero = torch.full_like(weight, 0.1), torch.full_like(weight, 8.0)
    gptq_quantize(weight[:64], hessian, spec, scale[:64], zero[:64])  # warm up
    start = time.perf_counter()
    gptq_quantize(weight, hessian, spec, scale, zero)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / weight.numel()


def _matmul_rate(rows: int, inner: int, cols: int, device: torch.device, recipe: Recipe | None) -> float:
    """Floating-point operations per second of a ``[rows, inner] x [inner, cols]`` product in
    the dtype the learner trains in (bf16 where a learning recipe trains under autocast; a
    recipe that learns nothing, e.g. GPTQ's, runs float32), timed for about a fifth of a second."""
    bf16 = recipe is not None and recipe.learn and use_bf16(recipe, device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(rows, inner, device=device, dtype=dtype)
    b = torch.randn(inner, cols, device=device, dtype=dtype)
    a @ b  # warm up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * rows * inner * cols * count / (time.perf_counter() - start)
