"""Public Python API: quantize a model, evaluate a model, load a quantized output.

Example::

    from lrquant import api
    from lrquant.config import build_scheme

    report = api.quantize("smollm2-135m", "out/w4g128", scheme=build_scheme(wbits=4, group_size=128))
    print(report["perplexity"])
"""

from __future__ import annotations

import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lrquant import __version__
from lrquant.checkpoint import REPORT_FILE, AtomicOutputDir, save_quantized, write_json
from lrquant.config import QuantScheme
from lrquant.console import log
from lrquant.data.text import (
    calibration_windows,
    evaluation_windows,
    load_documents,
    prepended_bos,
    tokenize_documents,
)
from lrquant.errors import LrquantError
from lrquant.eval.perplexity import perplexity
from lrquant.methods.blockwise import quantize_blockwise, report_dict
from lrquant.methods.resume import ResumeStore
from lrquant.methods.rtn import quantize_rtn
from lrquant.models.loading import LoadedModel, load_model
from lrquant.recipes import DEFAULT_METHOD, Recipe, build_recipe
from lrquant.report import PLOT_FILE, plot_blocks


@dataclass(frozen=True)
class DataSettings:
    """Where calibration and evaluation text come from and how it is windowed."""

    calib: str = "wikipedia:train"
    eval: str = "wikipedia:test"
    seqlen: int = 512
    nsamples: int | None = None  # None: the recipe's preset decides
    eval_windows: int | None = 32
    text_field: str = "text"
    seed: int = 0
    batch_size: int = 1


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def _check_seqlen(loaded: LoadedModel, seqlen: int) -> None:
    # Learned position embeddings (OPT) fail with an IndexError past the model's context.
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise LrquantError(f"--seqlen {seqlen} is longer than the model's context of {limit} tokens")


def evaluation_data(loaded: LoadedModel, data: DataSettings) -> torch.Tensor:
    """The evaluation windows ``[n, seqlen]`` for ``loaded``'s tokenizer."""
    _check_seqlen(loaded, data.seqlen)
    ids = tokenize_documents(load_documents(data.eval, "test", data.text_field), loaded.tokenizer)
    return evaluation_windows(ids, data.seqlen, prepended_bos(loaded.tokenizer), data.eval_windows)


def calibration_data(loaded: LoadedModel, data: DataSettings, nsamples: int) -> torch.Tensor:
    """``nsamples`` seeded calibration windows ``[nsamples, seqlen]``."""
    _check_seqlen(loaded, data.seqlen)
    ids = tokenize_documents(load_documents(data.calib, "train", data.text_field), loaded.tokenizer)
    return calibration_windows(ids, data.seqlen, prepended_bos(loaded.tokenizer), nsamples, data.seed)


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
    }


def evaluate(model: str, data: DataSettings | None = None, trust_remote_code: bool = False) -> dict:
    """Perplexity of ``model`` (a name, a folder, a .gguf, or a quantized output folder)."""
    data = data or DataSettings()
    start = time.perf_counter()
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    windows = evaluation_data(loaded, data)
    ppl = perplexity(loaded.model, windows, data.batch_size)
    return {
        "model": model,
        "model_type": loaded.model_type,
        "scheme": loaded.scheme.name if loaded.scheme else "fp",
        "data": data.eval,
        "seqlen": data.seqlen,
        "windows": windows.shape[0],
        "perplexity": ppl,
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def apply_method(
    loaded: LoadedModel,
    scheme: QuantScheme,
    method: str,
    recipe: Recipe,
    calibration: torch.Tensor | None,
    seed: int = 0,
    store: ResumeStore | None = None,
) -> list[dict]:
    """Quantize ``loaded.model`` in place; returns the per-block reports of a learned method.

    ``rtn`` needs no calibration; every other method learns (or, for ``smoothquant``, sets) its
    transforms block by block on ``calibration`` windows, resuming from ``store`` when it holds
    finished blocks of the same run.
    """
    if method == "rtn":
        quantize_rtn(loaded.model, loaded.arch, scheme)
        return []
    if calibration is None:
        raise LrquantError(f"method '{method}' needs calibration data")
    start = store.load(loaded.model, loaded.arch, scheme) if store is not None else None
    if start is not None:
        log(f"resuming at block {start[0] + 1} from {store.folder}")
    reports = quantize_blockwise(
        loaded.model,
        loaded.arch,
        scheme,
        recipe,
        calibration,
        seed,
        start,
        store.save_block if store is not None else None,
    )
    return store.reports if store is not None else [report_dict(r) for r in reports]


def _fingerprint(loaded, scheme, recipe, method, data, calibration) -> dict:
    return {
        "model": str(loaded.path),
        "scheme": scheme.model_dump(),
        "recipe": recipe.model_dump(),
        "method": method,
        "data": [data.calib, data.seqlen, data.seed, data.text_field],
        "calibration_checksum": int(calibration.sum()),
    }


def quantize(
    model: str,
    output: str | Path,
    scheme: QuantScheme,
    method: str = DEFAULT_METHOD,
    preset: str = "default",
    overrides: dict | None = None,
    data: DataSettings | None = None,
    evaluate_perplexity: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Quantize ``model`` with ``method`` and ``scheme``; write the checkpoint and report to ``output``.

    ``method`` names a recipe (``rtn``, ``smoothquant``, ``omniquant``, ``lrquant``,
    ``lrquant_plus``), ``preset`` its budget (``fast``, ``default``, ``paper``) and ``overrides``
    any recipe field. Returns the run report (also written as ``report.json``, with a per-block
    plot for learned methods): settings, seed, model, data, perplexity before and after (when
    ``evaluate_perplexity``), per-block losses, seconds per stage, peak RSS. The output folder
    appears only when everything succeeded; an interrupted learned run resumes when rerun.
    """
    data = data or DataSettings()
    if data.nsamples is not None:
        overrides = {**(overrides or {}), "nsamples": data.nsamples}
    recipe = build_recipe(method, preset, overrides)
    torch.manual_seed(data.seed)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 2)
        clock = now

    with AtomicOutputDir(output, overwrite) as out:
        log(f"loading {model}")
        loaded = load_model(model, trust_remote_code=trust_remote_code)
        lap("load")
        calibration = None if method == "rtn" else calibration_data(loaded, data, recipe.nsamples)
        windows = evaluation_data(loaded, data) if evaluate_perplexity else None
        perplexities: dict[str, float] = {}
        if windows is not None:
            log(f"full-precision perplexity on {windows.shape[0]} windows of {data.seqlen} tokens")
            perplexities["fp"] = perplexity(loaded.model, windows, data.batch_size, "fp perplexity")
            lap("eval_fp")
        log(f"quantizing with {method} at {scheme.name}")
        store = None
        if calibration is not None:
            store = ResumeStore(out.final, _fingerprint(loaded, scheme, recipe, method, data, calibration))
        blocks = apply_method(loaded, scheme, method, recipe, calibration, data.seed, store)
        lap("quantize")
        if windows is not None:
            perplexities["quantized"] = perplexity(
                loaded.model, windows, data.batch_size, "quantized perplexity"
            )
            lap("eval_quantized")
        save_quantized(out.tmp, loaded.model, loaded.tokenizer, loaded.arch, scheme, method)
        lap("save")
        report = {
            "method": method,
            "preset": preset,
            "scheme": scheme.name,
            "settings": scheme.model_dump(),
            "recipe": None if calibration is None else recipe.model_dump(),
            "model": {
                "name": model,
                "path": str(loaded.path),
                "model_type": loaded.model_type,
                "parameters": loaded.num_parameters,
            },
            "data": {
                "calibration": None if calibration is None else data.calib,
                "evaluation": data.eval,
                "seqlen": data.seqlen,
                "nsamples": None if calibration is None else calibration.shape[0],
                "eval_windows": None if windows is None else windows.shape[0],
            },
            "seed": data.seed,
            "perplexity": perplexities,
            "blocks": blocks,
            "seconds": {**seconds, "total": round(sum(seconds.values()), 2)},
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "environment": _environment(),
        }
        write_json(out.tmp / REPORT_FILE, report)
        if blocks:
            plot_blocks(blocks, out.tmp / PLOT_FILE, f"{method} {scheme.name}")
        out.commit()
    if store is not None:
        store.clear()
    log(f"wrote {out.final}")
    return report
