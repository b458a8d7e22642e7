"""Public Python API: quantize a model, evaluate a model, export a quantized output.

Example::

    from lrquant import api
    from lrquant.config import build_scheme

    report = api.quantize("smollm2-135m", "out/w4g128", scheme=build_scheme(wbits=4, group_size=128))
    print(report["perplexity"])
"""

from __future__ import annotations

import math
import platform
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lrquant import __version__, distributed
from lrquant.arch.registry import get_arch_spec
from lrquant.arch.vision_language import get_vision_language_spec
from lrquant.checkpoint import REPORT_FILE, read_source, save_quantized, save_streamed
from lrquant.config import QuantScheme
from lrquant.console import log
from lrquant.cost import estimate
from lrquant.device import placed, resolve_device
from lrquant.errors import LrquantError
from lrquant.export import check_options, default_destination, export_format, read_output, write_format
from lrquant.file_checks import read_json_object
from lrquant.inference import apply_backend, generate_text
from lrquant.methods.activations import Activations
from lrquant.methods.blockwise import quantize_blockwise, report_dict
from lrquant.methods.capture import batch_packed_blocks
from lrquant.methods.e2e import check_supported, end_to_end_wanted, fp_final_hidden, run_end_to_end
from lrquant.methods.resume import ResumeStore
from lrquant.methods.rtn import quantize_rtn, quantize_rtn_streamed
from lrquant.modalities import modality_named, modality_of
from lrquant.models.builtin import builtin_folder, cache_root, is_builtin
from lrquant.models.loading import LoadedModel, load_model, resolve_model_dir
from lrquant.models.streaming import too_large
from lrquant.output_dir import AtomicOutputDir, AtomicOutputFile, disk_space_for, write_json
from lrquant.quant.apply import check_projector, head_linears, patch_embedding
from lrquant.recipes import (
    AUTO,
    DEFAULT_METHOD,
    Recipe,
    Rule,
    Situation,
    build_recipe,
    default_rule,
)
from lrquant.report import PLOT_FILE, plot_blocks
from lrquant.transforms.hadamard import (
    RUN_TIME_HADAMARD,
    HadamardPlan,
    apply_hadamard,
    check_hadamard_supported,
)


@dataclass(frozen=True)
class DataSettings:
    """Where calibration and evaluation data come from, and how text is windowed.

    ``calib``/``eval`` left as None take the model's modality defaults
    (:mod:`lrquant.modalities`): Wikipedia text for a language model; for a vision model the
    built-in photos for calibration and :data:`~lrquant.eval.images.DEFAULT_IMAGE_EVAL` for
    evaluation. ``nsamples`` None: the preset's count of text windows, or 32 images.
    ``image_size`` overrides the model's input resolution.
    """

    calib: str | None = None
    eval: str | None = None
    seqlen: int = 512
    nsamples: int | None = None
    eval_windows: int | None = 32
    text_field: str = "text"
    seed: int = 0
    batch_size: int = 1
    image_size: int | None = None

    def __post_init__(self) -> None:
        # Checked as given: 0 is a bad count, not "unset" (None is).
        for flag, value, least in (
            ("--nsamples", self.nsamples, 1),
            ("--eval-windows", self.eval_windows, 1),
            ("--batch-size", self.batch_size, 1),
            ("--image-size", self.image_size, 8),
        ):
            if value is not None and value < least:
                unit = " pixels" if flag == "--image-size" else ""
                raise LrquantError(f"{flag} must be at least {least}{unit} (got {value})")

    def for_model(self, loaded: LoadedModel) -> DataSettings:
        """These settings with the modality's defaults filled in."""
        return modality_of(loaded.arch).settings(self, loaded)


def peak_device_memory(device: torch.device) -> dict:
    """``{"peak_gpu_mb": ...}`` for a CUDA device (peak allocated by this process), else ``{}``."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB: Linux's ``VmHWM`` (the peak of this
    program; ``ru_maxrss`` also keeps the peak of the process that started it, across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def evaluation_data(loaded: LoadedModel, data: DataSettings) -> torch.Tensor:
    """The evaluation windows ``[n, seqlen]`` of a language model, for its tokenizer."""
    return modality_named("text").windows(loaded, data.for_model(loaded))


def calibration_data(loaded: LoadedModel, data: DataSettings, nsamples: int) -> torch.Tensor:
    """``nsamples`` seeded calibration samples of ``loaded``'s modality: windows ``[nsamples,
    seqlen]`` of text, or images ``[nsamples, 3, H, W]``."""
    return modality_of(loaded.arch).calibration(loaded, data.for_model(loaded), nsamples)


def _environment() -> dict:
    import transformers

    return {
        "lrquant": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        **({"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}),
    }


def evaluate(
    model: str,
    data: DataSettings | None = None,
    trust_remote_code: bool = False,
    reference: str | None = None,
    device: str = "auto",
    backend: str = "fake",
    stream: bool = False,
) -> dict:
    """Evaluate ``model`` (a name, a folder, a .gguf, or a quantized output folder).

    A language model gets its perplexity and, with a reference, its mean KL divergence from the
    reference's next-token distribution and their top-1 agreement. A vision model gets, on each
    evaluation set, the cosine similarity of its features to ``reference``'s and top-1 or
    linear-probe accuracy (probes are trained on the reference's features). The reference
    defaults to the model a quantized folder was made from, when that is still there (else none
    for a language model, the model itself for a vision model). ``device``: see
    :func:`lrquant.device.resolve_device`. ``backend``: how a quantized output's linears run
    (:mod:`lrquant.inference`; ``fake``, the default, computes exactly as the run evaluated).
    ``stream``: a language model (and its reference) is scored one block at a time, never whole
    in memory (:func:`lrquant.eval.perplexity.score_streamed`), on the CPU.
    """
    start = time.perf_counter()
    target = resolve_device(device)
    if stream and backend != "fake":
        raise LrquantError(
            f"--stream evaluates with the fake backend only, not '{backend}': leave out --backend"
        )
    loaded = load_model(model, trust_remote_code=trust_remote_code, stream=stream)
    data = (data or DataSettings()).for_model(loaded)
    result = {
        "model": model,
        "model_type": loaded.model_type,
        "scheme": loaded.scheme.name if loaded.scheme else "fp",
        **({"vision_scheme": loaded.vision_scheme.name} if loaded.vision_scheme else {}),
        "data": data.eval,
        "backend": apply_backend(loaded, backend, target),
    }
    reference = reference or _source_model(loaded)
    fp = None
    if reference is not None:
        fp = load_model(reference, trust_remote_code=trust_remote_code, stream=stream)
        fp = fp if stream else fp.model
    result.update(reference=reference, **modality_of(loaded.arch).evaluate(loaded, data, fp, target))
    return {
        **result,
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": str(target),
    }


def generate(
    model: str,
    prompt: str,
    max_new_tokens: int = 64,
    backend: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    echo: bool = True,
) -> dict:
    """Continue ``prompt`` greedily with ``model`` (a quantized output runs on packed CPU kernels
    where they exist: ``backend``), streaming the text to stdout when ``echo``; returns the text
    and the prefill and decode speeds in tokens per second."""
    target = resolve_device(device)
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    used = apply_backend(loaded, backend, target)
    with placed(loaded.model, target):
        result = generate_text(loaded, prompt, max_new_tokens, echo)
    return {
        "model": model,
        "scheme": loaded.scheme.name if loaded.scheme else "fp",
        "backend": used,
        **result,
    }


def _source_model(loaded: LoadedModel) -> str | None:
    """The full-precision model a quantized folder was made from, if it can still be loaded."""
    source = read_source(loaded.path)
    if source is None:
        return None
    try:
        resolve_model_dir(source)
    except LrquantError:
        log(f"the source model '{source}' is gone: there is no full-precision model to compare with")
        return None
    return source


def apply_method(
    loaded: LoadedModel,
    scheme: QuantScheme,
    method: str,
    recipe: Recipe,
    calibration: torch.Tensor | None,
    seed: int = 0,
    store: ResumeStore | None = None,
    device: torch.device | None = None,
    max_memory: int | None = None,
    activations: list[dict] | None = None,
) -> list[dict]:
    """Quantize ``loaded.model`` in place; returns the per-block reports of a learned method
    (with ``e2e_epochs``, the last one also holds ``e2e_kl``, the KL per end-to-end epoch).

    ``rtn`` needs no calibration; every other method learns (or, for ``smoothquant``, sets) its
    transforms block by block on the first ``recipe.nsamples`` ``calibration`` windows, resuming
    from ``store`` when it holds finished blocks of the same run, then, with ``e2e_epochs``, runs
    the end-to-end step (:func:`lrquant.methods.e2e.run_end_to_end`; also after a resumed run
    that had every block finished). An end-to-end step with more windows (``e2e_samples``) takes
    them from the rest: pass ``recipe.calibration_samples``.

    A streamed model (``loaded.stream``) is quantized one block at a time; each finished block
    lives in ``store`` (then required) until the output is written.

    The calibration chains are kept in ``recipe.chain_dtype``, in memory while they take at most
    ``max_memory`` bytes (None: half the memory available), else in memory-mapped files in the
    store's folder (:mod:`lrquant.methods.activations`); where they lived is appended to
    ``activations`` (for the report).
    """
    stream = loaded.stream
    if stream is not None:
        check_streamable(recipe, scheme)
    # before resuming: same seed, same Q (a streamed model's blocks are rotated as they are loaded)
    if stream is None:
        apply_hadamard(loaded.model, loaded.arch, recipe.hadamard, seed)
    else:
        plan = HadamardPlan.of(loaded.model, loaded.arch, recipe.hadamard, seed)
        if plan.q is not None or scheme.head:  # they change the embedding and the head
            stream.to_float32()
        plan.outside_blocks(loaded.model)
        stream.on_load.append(lambda _name, block: plan.block(block))
    if method == "rtn":
        if recipe.e2e_epochs:
            raise LrquantError(
                "e2e_epochs tunes step sizes on calibration data, which rtn does not use: "
                "choose another method or leave e2e_epochs at 0"
            )
        if stream is not None:
            if distributed.is_main():  # rounding to nearest is quick to redo: no resuming
                store.clear()
            store.bind(loaded.model, loaded.arch)
            quantize_rtn_streamed(stream, scheme, lambda index, block: store.save_block(index, block, None))
        else:
            quantize_rtn(loaded.model, loaded.arch, scheme)
        return []
    if calibration is None:
        raise LrquantError(f"method '{method}' needs calibration data")
    end_to_end = end_to_end_wanted(recipe, scheme)
    if end_to_end:
        check_supported(loaded.model, loaded.arch)  # before any work
    calibration, e2e_extra = _e2e_extra(loaded, scheme, recipe, calibration, device)
    start = (
        store.load(loaded.model, loaded.arch, scheme, restore=stream is None) if store is not None else None
    )
    if start is not None:
        log(f"resuming at block {start[0] + 1} from {store.folder}")
    spill = store.folder / "activations" if store is not None else None
    acts = Activations.of(recipe.chain_dtype, device or torch.device("cpu"), spill, max_memory)
    result = quantize_blockwise(
        loaded.model,
        loaded.arch,
        scheme,
        recipe,
        calibration,
        seed,
        start,
        store.save_block if store is not None else None,
        device,
        stream,
        acts,
    )
    if activations is not None:
        activations.append(acts.as_dict())
    blocks = store.reports if store is not None else [report_dict(r) for r in result.reports]
    if end_to_end:
        # after every block (also on a resumed run that had finished them all): rerun in full
        # when interrupted, from the saved blocks and chain
        fp_hidden = result.fp_hidden
        if distributed.world() > 1:  # process 0 tunes on every window, as one process would
            fp_hidden = distributed.gather_windows(fp_hidden, calibration.shape[0])
            if not distributed.is_main():
                return blocks
        kl = run_end_to_end(
            loaded.model,
            loaded.arch,
            recipe,
            calibration,
            fp_hidden,
            seed,
            device,
            e2e_extra,
            None if stream is None else (stream, store, scheme),
        )
        if blocks:
            blocks[-1] = {**blocks[-1], "e2e_kl": kl}
    return blocks


def _stream_wanted(model: str, stream: bool | None) -> bool:
    """``stream`` as asked, or (None) whether ``model`` is a language model too large to hold
    in float32 (:func:`lrquant.models.streaming.too_large`)."""
    if stream is not None:
        return stream
    arch = _config_arch(model)
    if arch is None or arch.modality != "text":
        return False
    path = resolve_model_dir(model)
    if not too_large(path):
        return False
    log(f"'{model}' would take most of this machine's free memory in float32: it is streamed")
    return True


def check_streamable(recipe: Recipe, scheme: QuantScheme) -> None:
    """Refuse, in one line, what a streamed run cannot do yet: an end-to-end step on more windows
    than the block-wise pass (their targets need the whole full-precision model)."""
    if end_to_end_wanted(recipe, scheme) and recipe.e2e_samples > recipe.nsamples:
        raise LrquantError(
            f"e2e_samples={recipe.e2e_samples} runs the full-precision model whole on the windows beyond "
            f"the block-wise pass's {recipe.nsamples}, which a streamed run does not hold: use "
            "--set e2e_samples=0, or quantize without --stream"
        )


def _sample_tokens(loaded: LoadedModel, data: DataSettings) -> int:
    """Tokens per calibration sample: the window length of text, the patches of an image."""
    if loaded.arch.modality != "image":
        return data.seqlen
    config = loaded.arch.config_of(loaded.model)
    size = data.image_size or getattr(config, "image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = getattr(config, "patch_size", 16)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return (int(size) // int(patch)) ** 2 + 1


def _check_processes(recipe: Recipe, calibration: torch.Tensor) -> None:
    """Refuse, in one line, what a run over several processes cannot do: fewer calibration
    windows than processes."""
    processes = distributed.world()
    if processes == 1:
        return
    if min(calibration.shape[0], recipe.nsamples) < processes:
        raise LrquantError(
            f"{processes} processes need at least {processes} calibration windows, got "
            f"{min(calibration.shape[0], recipe.nsamples)}: raise --nsamples or start fewer processes"
        )


class _Follower:
    """The output of a process other than 0 (:mod:`lrquant.distributed`): its paths (where the
    resume store is), nothing written."""

    def __init__(self, output: str | Path) -> None:
        self.final = Path(output).expanduser().absolute()
        self.tmp = None

    def __enter__(self) -> _Follower:
        return self

    def __exit__(self, *exc) -> None:
        return None


def _check_has_tower(arch, name: str) -> None:
    """Refuse ``--quantize-vision`` for a model that is not a vision-language one, in one line."""
    if arch.modality != "image-text":
        raise LrquantError(
            f"--quantize-vision applies to a vision-language model; '{name}' is a "
            f"{'vision' if arch.modality == 'image' else 'language'} model: quantize it without "
            "--quantize-vision (a vision transformer on its own is quantized whole)"
        )


def _check_projector(loaded: LoadedModel, scheme: QuantScheme, vision_scheme: QuantScheme | None) -> None:
    """Refuse, before any work, a projector that cannot be quantized as asked."""
    if scheme.projector:
        check_projector(loaded.model, loaded.arch)
    if vision_scheme is not None and vision_scheme.projector:
        raise LrquantError(
            "the projector is quantized with the language model's scheme (its projector=True), "
            "not the vision tower's"
        )


def _vision_tower(loaded: LoadedModel) -> LoadedModel:
    """``loaded`` seen through its vision tower's map, or one clear error for a model without one."""
    _check_has_tower(loaded.arch, loaded.name)
    spec = get_vision_language_spec(loaded.model_type)
    tower = spec.vision_arch(loaded.model.config)
    batch_packed_blocks(loaded.model, tower)
    return replace(loaded, arch=tower)


def tower_recipe(
    method: str, preset: str, overrides: dict | None, vision_scheme: QuantScheme, packed: bool
) -> tuple[Recipe, Rule | None]:
    """The recipe of a vision-language model's vision tower, and the default rule that chose it
    (``auto``): a vision transformer's. The end-to-end step tunes the language model on its
    output, so the tower learns block by block only."""
    where = Situation.of(vision_scheme, "image", packed, rotatable=False)
    recipe = build_recipe(method, preset, overrides, situation=where)
    if recipe.e2e_epochs:
        recipe = recipe.model_copy(update={"e2e_epochs": 0})
    return recipe, default_rule(where) if method == AUTO else None


def _quantize_tower(
    tower: LoadedModel,
    vision_scheme: QuantScheme,
    method: str,
    preset: str,
    overrides: dict | None,
    format: str | None,
    calibration,
    data: DataSettings,
    output: Path,
    device: torch.device,
    max_memory: int | None = None,
) -> tuple[dict, ResumeStore | None]:
    """Quantize the vision tower of a vision-language model in place, on the image-text pairs;
    returns the report's ``vision`` section and the tower's resume store (cleared once the
    output is written)."""
    recipe, rule = tower_recipe(method, preset, overrides, vision_scheme, format is not None)
    if rule is not None:
        log(f"vision tower recipe: LRQuant+ for a {rule.when}{_rule_summary(rule)}")
    log(f"quantizing the vision tower with {method} at {vision_scheme.name}")
    store = None
    if calibration is not None:
        fingerprint = _fingerprint(tower, vision_scheme, recipe, method, data, calibration)
        store = ResumeStore(output, fingerprint, part="vision")
    activations: list[dict] = []
    blocks = apply_method(
        tower, vision_scheme, method, recipe, calibration, data.seed, store, device, max_memory, activations
    )
    report = {
        "scheme": vision_scheme.name,
        "settings": vision_scheme.model_dump(),
        **({"rule": rule.as_dict()} if rule is not None else {}),
        "recipe": None if calibration is None else recipe.model_dump(),
        "blocks": blocks,
        **({"activations": activations[0]} if activations else {}),
    }
    return report, store


def _e2e_extra(
    loaded: LoadedModel,
    scheme: QuantScheme,
    recipe: Recipe,
    calibration: torch.Tensor,
    device: torch.device | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Split off the windows only the end-to-end step trains on, with their full-precision last
    hidden states (computed now, while the model is still in full precision; also on a resumed
    run, which restores its finished blocks afterwards)."""
    blockwise, extra = calibration[: recipe.nsamples], calibration[recipe.nsamples :]
    if not end_to_end_wanted(recipe, scheme) or recipe.e2e_samples <= recipe.nsamples:
        return blockwise, None
    if not distributed.is_main():  # process 0 alone runs the end-to-end step
        return blockwise, None
    if calibration.shape[0] < recipe.e2e_samples:
        raise LrquantError(
            f"e2e_samples={recipe.e2e_samples} needs that many calibration windows, got "
            f"{calibration.shape[0]}: pass recipe.calibration_samples windows"
        )
    extra = extra[: recipe.e2e_samples - recipe.nsamples]
    device = device or torch.device("cpu")
    log(f"full-precision targets for {extra.shape[0]} more end-to-end samples")
    with placed(loaded.model, device):
        return blockwise, (extra, fp_final_hidden(loaded.model, loaded.arch, extra, device))


def _fingerprint(loaded, scheme, recipe, method, data, calibration) -> dict:
    return {
        "model": str(loaded.path),
        "scheme": scheme.model_dump(),
        "recipe": recipe.model_dump(),
        "method": method,
        "data": [data.calib, data.seqlen, data.seed, data.text_field],
        "calibration_checksum": None if calibration is None else int(calibration.sum()),
    }


def quantize(
    model: str,
    output: str | Path,
    scheme: QuantScheme,
    method: str = DEFAULT_METHOD,
    preset: str = "default",
    overrides: dict | None = None,
    data: DataSettings | None = None,
    run_eval: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    device: str = "auto",
    format: str | None = None,
    gguf_type: str | None = None,
    vision_scheme: QuantScheme | None = None,
    stream: bool | None = None,
    max_memory: int | None = None,
) -> dict:
    """Quantize ``model`` with ``method`` and ``scheme``; write the checkpoint and report to ``output``.

    ``method`` names a recipe (``rtn``, ``smoothquant``, ``omniquant``, ``lrquant``,
    ``lrquant_plus``), ``preset`` its budget (``fast``, ``default``, ``paper``) and ``overrides``
    any recipe field. Returns the run report (also written as ``report.json``, with a per-block
    plot for learned methods): settings, seed, model, data, evaluation before and after (when
    ``run_eval``: perplexity for a language model, feature cosine and top-1 or probe accuracy
    for a vision model), per-block losses, seconds per stage, peak RSS. The output folder
    appears only when everything succeeded; an interrupted learned run resumes when rerun.
    ``device`` is where blocks are learned and the model evaluated (``auto``: a CUDA GPU when
    there is one); the model itself stays in host memory.

    With ``format``, the output is then packed by :func:`export` (beside ``output``; its result is
    the report's ``export``). For ``gguf``, each linear learns the grid of the GGUF type it will be
    written as (``gguf_type``: ``--gguf-type`` rules or a llama.cpp mix such as ``Q4_K_M``), not
    one grid for all: a mix gives some tensors more bits, and the learner uses them.

    ``vision_scheme``: a vision-language model's vision tower is quantized too, at this scheme,
    first (its own resume store and default rule: a vision transformer's); the language model
    then learns on what the quantized tower produces. The report's ``vision`` section holds the
    tower's recipe and blocks. Without it the tower, like the projector, stays in full precision.

    ``stream`` (a language model): the model is never whole in memory. Its blocks are loaded from
    the safetensors files one at a time, learned, written to the resume store and dropped; the
    output links the store's blocks, and is evaluated block by block (the quantized and the
    full-precision model side by side). The end-to-end step reads each block from the store for
    its forward and again for its backward. The output equals an in-memory run's.
    ``None``: streamed when the model is a language model that would take more than 60 % of the
    available memory in float32.

    ``max_memory``: the bytes the calibration activations may hold in memory; past them they go
    to memory-mapped files in the run's resume folder (None: half the memory available when
    the block-wise pass starts). The report's ``activations`` says where they lived.
    """
    target = resolve_device(device)
    distributed.start(target)  # under torchrun: join the other processes (:mod:`lrquant.distributed`)
    # bad recipe settings fail before a model is loaded
    recipe = build_recipe(method, preset, overrides, situation=situation(model, scheme, format))
    if format is not None:  # a wrong format, scheme or destination fails before any work
        fmt = export_format(format)
        check_options(fmt, scheme, gguf_type, _model_config(model))
        if recipe.hadamard in RUN_TIME_HADAMARD:
            raise LrquantError(
                f"hadamard={recipe.hadamard} rotates linear inputs at run time, which packed formats "
                "cannot hold exactly: use --set hadamard=folded, or quantize without --format"
            )
        atomic = AtomicOutputFile if fmt.single_file else AtomicOutputDir
        atomic.check_destination(default_destination(output, fmt), overwrite)
    elif gguf_type is not None:
        raise LrquantError("--gguf-type chooses the types of a GGUF export: give it with --format gguf")
    torch.manual_seed((data or DataSettings()).seed)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 2)
        clock = now

    main = distributed.is_main()  # process 0 writes; the others only learn beside it
    with AtomicOutputDir(output, overwrite, _input_paths(model, data)) if main else _Follower(output) as out:
        stream = _stream_wanted(model, stream)
        log(f"loading {model}" + (", one block at a time (streamed)" if stream else ""))
        loaded = load_model(model, trust_remote_code=trust_remote_code, stream=stream)
        tower = None if vision_scheme is None else _vision_tower(loaded)
        _check_projector(loaded, scheme, vision_scheme)
        modality = modality_of(loaded.arch)
        data = (data or DataSettings()).for_model(loaded)
        nsamples = data.nsamples if data.nsamples is not None else modality.default_samples
        if nsamples is not None:
            overrides = {**(overrides or {}), "nsamples": nsamples}
        now = _situation(loaded.arch, scheme, format)
        recipe = build_recipe(method, preset, overrides, situation=now)
        rule = default_rule(now) if method == AUTO else None
        if rule is not None:
            log(f"recipe: LRQuant+ for a {rule.when}{_rule_summary(rule)}")
        if scheme.patch_embed:
            patch_embedding(loaded.model)  # a model without one stops here, before any work
        _note_whole_row_groups(loaded, scheme)
        if format == "gguf":
            scheme = _gguf_grids(loaded, scheme, gguf_type)
        lap("load")
        cost = estimate(
            loaded.model,
            loaded.arch,
            scheme,
            None if method == "rtn" else recipe,
            recipe.nsamples,
            _sample_tokens(loaded, data),
            target,
            stream,
            distributed.world(),
            run_eval,
            max_memory,
        )
        log(f"estimate: {cost.words()}")
        calibration = None
        if method != "rtn":
            calibration = calibration_data(loaded, data, recipe.calibration_samples)
            _check_processes(recipe, calibration)
        evaluation: dict[str, object] = {}
        run_eval = run_eval and main
        if run_eval and stream:  # scored after saving, side by side (Text.streamed_evaluation)
            stages = modality.streamed_evaluation(
                loaded,
                data,
                lambda: load_model(str(out.tmp), stream=True),
                lambda: load_model(model, trust_remote_code=trust_remote_code, stream=True),
            )
        elif run_eval:
            stages = modality.evaluation(
                loaded, data, target, lambda: load_model(model, trust_remote_code=trust_remote_code).model
            )
            evaluation["fp"] = stages.fp()
            lap("eval_fp")
        vision, stores = None, []
        if tower is not None:
            vision, tower_store = _quantize_tower(
                tower,
                vision_scheme,
                method,
                preset,
                overrides,
                format,
                calibration,
                data,
                out.final,
                target,
                max_memory,
            )
            stores += [tower_store] if tower_store is not None else []
            lap("quantize_vision")
        log(f"quantizing with {method} at {scheme.name}")
        store = None
        if calibration is not None or stream:
            fingerprint = _fingerprint(loaded, scheme, recipe, method, data, calibration)
            if vision is not None:  # the language model learns on what the quantized tower gives
                fingerprint["vision"] = {key: vision[key] for key in ("settings", "recipe")}
            store = ResumeStore(out.final, fingerprint)
            stores.append(store)
        activations: list[dict] = []
        blocks = apply_method(
            loaded, scheme, method, recipe, calibration, data.seed, store, target, max_memory, activations
        )
        lap("quantize")
        if not main:
            return {"process": distributed.rank(), "processes": distributed.world(), "seconds": seconds}
        if run_eval and not stream:
            evaluation["quantized"] = stages.quantized()
            lap("eval_quantized")
        source_name = model if is_builtin(model) else str(loaded.path.resolve())
        kept = (
            f"the finished blocks are kept in '{store.folder}'" if store is not None else "nothing was kept"
        )
        with disk_space_for(
            "the quantized model",
            out.final.parent,
            _saved_bytes(loaded),
            f"any earlier output is unchanged and {kept}: free space and rerun the same command",
        ):
            if stream:
                save_streamed(
                    out.tmp,
                    loaded,
                    store,
                    loaded.tokenizer,
                    scheme,
                    method,
                    loaded.path,
                    source_name,
                )
            else:
                save_quantized(
                    out.tmp,
                    loaded.model,
                    loaded.processor or loaded.tokenizer,  # a processor saves its tokenizer too
                    loaded.arch,
                    scheme,
                    method,
                    loaded.path,
                    source_name,
                    vision=None if tower is None else (tower.arch, vision_scheme),
                )
            lap("save")
            if run_eval and stream:
                quantized_ppl = stages.quantized()
                evaluation.update(fp=stages.fp(), quantized=quantized_ppl)
                lap("eval")
            report = {
                "method": method,
                **({"rule": rule.as_dict()} if rule is not None else {}),
                "preset": preset,
                "scheme": scheme.name,
                "settings": scheme.model_dump(),
                "recipe": None if calibration is None else recipe.model_dump(),
                "model": {
                    "name": model,
                    "path": str(loaded.path),
                    "model_type": loaded.model_type,
                    "modality": modality.name,
                    "parameters": loaded.num_parameters,
                    "streamed": stream,
                },
                "data": {
                    "calibration": None if calibration is None else data.calib,
                    "evaluation": data.eval if run_eval else None,
                    **modality.data_report(data, calibration),
                    "nsamples": None if calibration is None else min(calibration.shape[0], recipe.nsamples),
                    "eval_windows": None,
                    **(stages.details if run_eval else {}),
                },
                "seed": data.seed,
                "estimate": {
                    **cost.as_dict(),
                    "measured": {
                        "seconds_per_block": round(seconds["quantize"] / cost.blocks, 2),
                        "peak_memory_mb": round(peak_rss_mb(), 1),
                    },
                },
                modality.report_key: evaluation,
                **({"fidelity": stages.fidelity} if run_eval and stages.fidelity else {}),
                **(stages.more if run_eval else {}),
                "blocks": blocks,
                **({"activations": activations[0]} if activations else {}),
                **({"vision": vision} if vision is not None else {}),
                "seconds": {**seconds, "total": round(sum(seconds.values()), 2)},
                "peak_rss_mb": round(peak_rss_mb(), 1),
                **peak_device_memory(target),
                "device": str(target),
                "environment": _environment(),
            }
            write_json(out.tmp / REPORT_FILE, report)
            if blocks:
                plot_blocks(blocks, out.tmp / PLOT_FILE, f"{method} {scheme.name}")
            out.commit()
        for finished in stores:
            finished.clear()  # under the output lock, which a second run waits on
    log(f"wrote {out.final}")
    if recipe.hadamard in RUN_TIME_HADAMARD:
        log(
            f"hadamard={recipe.hadamard} rotates linear inputs at run time: lrquant eval and lrquant's "
            "loader apply it, plain from_pretrained does not (for an engine, quantize with --format)"
        )
    if format is not None:
        report["export"] = export(output, format, overwrite=overwrite, gguf_type=gguf_type)
    return report


def explain(
    model: str,
    scheme: QuantScheme,
    method: str = DEFAULT_METHOD,
    preset: str = "default",
    overrides: dict | None = None,
    format: str | None = None,
    trust_remote_code: bool = False,
    vision_scheme: QuantScheme | None = None,
) -> dict:
    """The recipe :func:`quantize` would run with these arguments, and why, without running it:
    ``method``, the default rule that chose it (``auto`` only), every recipe field, and those that
    differ from LRQuant+ as published at the same budget; with ``vision_scheme``, the same for the
    vision tower under ``vision``."""
    arch = _config_arch(model)
    if arch is None:  # e.g. a built-in model not converted yet: load it to know
        arch = load_model(model, trust_remote_code=trust_remote_code).arch
    if vision_scheme is not None:
        _check_has_tower(arch, model)
    where = _situation(arch, scheme, format)
    recipe = build_recipe(method, preset, overrides, situation=where)
    plan = {
        "method": method,
        "preset": preset,
        **_plan(scheme, recipe, default_rule(where) if method == AUTO else None, preset),
    }
    if vision_scheme is not None:
        tower, rule = tower_recipe(method, preset, overrides, vision_scheme, format is not None)
        plan["vision"] = _plan(vision_scheme, tower, rule, preset)
    return plan


def _plan(scheme: QuantScheme, recipe: Recipe, rule: Rule | None, preset: str) -> dict:
    paper = build_recipe("lrquant_plus", preset).model_dump()
    return {
        **({"rule": rule.as_dict()} if rule else {}),
        "scheme": scheme.name,
        "differs_from_lrquant_plus": {
            key: value for key, value in recipe.model_dump().items() if paper[key] != value
        },
        "recipe": recipe.model_dump(),
    }


def situation(model: str, scheme: QuantScheme, format: str | None = None) -> Situation:
    """What the default recipe of quantizing ``model`` at ``scheme`` is chosen by, read from its
    config without loading weights (a model whose config cannot be read yet counts as a
    language model the Hadamard rotations cover until it is loaded)."""
    arch = _config_arch(model)
    if arch is None:
        return Situation.of(scheme, "text", format is not None)
    return _situation(arch, scheme, format)


def _situation(arch, scheme: QuantScheme, format: str | None) -> Situation:
    return Situation.of(scheme, arch.modality, format is not None, hadamard_supported(arch))


def _config_arch(model: str):
    """The architecture ``model``'s config names, when the config can be read before loading
    and names a supported one; None otherwise (loading says what is wrong)."""
    config = _model_config(model)
    if config is None:
        return None
    try:
        return get_arch_spec(str(config.get("model_type")))
    except LrquantError:
        return None


def hadamard_supported(arch) -> bool:
    """Whether the Hadamard rotations of the residual stream (``hadamard=folded`` or ``online``)
    cover ``arch`` (:func:`lrquant.transforms.hadamard.check_hadamard_supported`)."""
    try:
        check_hadamard_supported(arch)
    except LrquantError:
        return False
    return True


def _rule_summary(rule: Rule) -> str:
    added = " ".join(f"{key}={value}" for key, value in rule.fields.items())
    return f" ({added}): {rule.why}" if added else f": {rule.why}"


def _model_config(model: str) -> dict | None:
    """The model's config.json, when it can be read before loading (a folder or a built-in model
    already converted), for the checks that fail fast; None otherwise."""
    folder = builtin_folder(model) if is_builtin(model) else Path(model).expanduser()
    try:
        return read_json_object(folder / "config.json", "a model config")
    except LrquantError:
        return None  # loading says what is wrong with it


def _gguf_grids(loaded: LoadedModel, scheme: QuantScheme, gguf_type: str | None) -> QuantScheme:
    """``scheme`` with each linear's grid that of the GGUF type it will be written as."""
    from lrquant.export.gguf import learned_grids

    model, arch = loaded.model, loaded.arch
    linears = {
        f"{prefix}.{name}": module.in_features
        for prefix, block in arch.named_blocks(model)
        for name, module in block.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    if scheme.head:
        linears.update({name: head.in_features for name, head in head_linears(model, arch)})
    floats = {  # the other matrices (a tied head shares the embedding's, listed once)
        key: p.shape[1]
        for key, p in model.named_parameters()
        if p.dim() == 2 and key.removesuffix(".weight") not in linears
    }
    return learned_grids(scheme, model.config.to_dict(), linears, floats, gguf_type)


def _input_paths(model: str, data: DataSettings | None) -> list[Path]:
    """The local files and folders a run reads (model, data), which its output may not replace."""
    names = [model] if not is_builtin(model) else []
    for source in (data.calib, data.eval) if data is not None else ():
        names += [part.rsplit("@", 1)[0] for part in (source or "").split(",")]
    paths = [cache_root() / "models" / model] if is_builtin(model) else []
    return paths + [Path(name).expanduser() for name in names if name and Path(name).expanduser().exists()]


def _note_whole_row_groups(loaded: LoadedModel, scheme: QuantScheme) -> None:
    """Say when ``--group-size`` is at least some rows' length: those rows are one group each,
    which is per-channel quantization (never padded out to the group size)."""
    size = scheme.weight.group_size if scheme.weight.granularity == "group" else None
    if size is None:
        return
    lengths = {
        module.in_features
        for block in loaded.arch.block_list(loaded.model)
        for module in block.modules()
        if isinstance(module, torch.nn.Linear)
    }
    short = sorted(n for n in lengths if n <= size)
    if short:
        rows = "every row" if len(short) == len(lengths) else f"rows of {', '.join(map(str, short))} columns"
        log(f"--group-size {size} covers {rows} whole: each such row is one group (per channel)")


def _saved_bytes(loaded: LoadedModel) -> int:
    """About the size of the saved output: every tensor of the model (a streamed model's blocks
    are in its resume store, linked into the output), plus its tokenizer files."""
    blocks = tuple(f"{name}." for name in loaded.stream.names) if loaded.stream is not None else ()
    tensors = sum(
        t.numel() * t.element_size() for k, t in loaded.model.state_dict().items() if not k.startswith(blocks)
    )
    return tensors + sum(p.stat().st_size for p in loaded.path.glob("tokenizer*") if p.is_file())


def export(
    output: str | Path,
    format: str,
    destination: str | Path | None = None,
    overwrite: bool = False,
    gguf_type: str | None = None,
) -> dict:
    """Pack the quantized output folder ``output`` into ``format`` (``compressed-tensors``: a
    folder; ``gguf``: one file) at ``destination`` (default: beside ``output``, named after it),
    from the integer codes the run ended on: nothing is quantized again. Written atomically;
    ``overwrite`` replaces only an earlier export lrquant wrote. ``gguf_type`` chooses GGUF
    types per tensor (``--gguf-type``). Returns the path, format and size in bytes."""
    fmt = export_format(format)
    start = time.perf_counter()
    source = read_output(output)
    check_options(fmt, source.scheme, gguf_type)
    path = destination if destination is not None else default_destination(output, fmt)
    if source.folder.resolve() in Path(path).expanduser().resolve().parents:
        raise LrquantError(
            f"'{path}' is inside the quantized output '{output}', which would then hold files it did "
            "not write: choose a path outside it"
        )
    atomic = AtomicOutputFile if fmt.single_file else AtomicOutputDir
    with atomic(path, overwrite, [source.folder]) as out:
        log(f"packing {source.folder} ({source.scheme.name}) as {fmt.name}")
        with disk_space_for(
            f"the {fmt.name} export", out.final.parent, _packed_bytes(source), "nothing was kept"
        ):
            write_format(source, fmt, out.tmp, gguf_type)
            out.commit()
    size = sum(p.stat().st_size for p in ([out.final] if fmt.single_file else out.final.rglob("*")))
    log(f"wrote {out.final} ({size / 2**20:.1f} MiB, for {fmt.engines})")
    return {
        "format": fmt.name,
        "path": str(out.final),
        "bytes": size,
        "source": str(source.folder),
        "scheme": source.scheme.name,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _packed_bytes(source) -> int:
    """About the size of a packed export: the codes at their width, the rest as stored."""
    codes = sum(
        math.prod(source.linear_shape(name)) * source.scheme_of(name).weight_for(name).bits // 8
        for name in source.linears
    )
    metas = (source.tensor_meta(key) for key in source.tensors)
    return codes + sum(math.prod(shape) * dtype.itemsize for shape, dtype in metas)
