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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lrquant import __version__
from lrquant.arch import ArchSpec
from lrquant.checkpoint import REPORT_FILE, AtomicOutputDir, save_quantized, write_json
from lrquant.config import QuantScheme
from lrquant.data.text import (
    calibration_windows,
    evaluation_windows,
    load_documents,
    prepended_bos,
    tokenize_documents,
)
from lrquant.errors import LrquantError
from lrquant.eval.perplexity import perplexity
from lrquant.methods.rtn import quantize_rtn
from lrquant.models.loading import LoadedModel, load_model

Method = Callable[[torch.nn.Module, ArchSpec, QuantScheme], None]
METHODS: dict[str, Method] = {"rtn": quantize_rtn}


@dataclass(frozen=True)
class DataSettings:
    """Where calibration and evaluation text come from and how it is windowed."""

    calib: str = "wikipedia:train"
    eval: str = "wikipedia:test"
    seqlen: int = 512
    nsamples: int = 128
    eval_windows: int | None = 32
    text_field: str = "text"
    seed: int = 0
    batch_size: int = 1


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"lrquant: {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def evaluation_data(loaded: LoadedModel, data: DataSettings) -> torch.Tensor:
    """The evaluation windows ``[n, seqlen]`` for ``loaded``'s tokenizer."""
    ids = tokenize_documents(load_documents(data.eval, "test", data.text_field), loaded.tokenizer)
    return evaluation_windows(ids, data.seqlen, prepended_bos(loaded.tokenizer), data.eval_windows)


def calibration_data(loaded: LoadedModel, data: DataSettings) -> torch.Tensor:
    """The seeded calibration windows ``[nsamples, seqlen]``."""
    ids = tokenize_documents(load_documents(data.calib, "train", data.text_field), loaded.tokenizer)
    return calibration_windows(ids, data.seqlen, prepended_bos(loaded.tokenizer), data.nsamples, data.seed)


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


def quantize(
    model: str,
    output: str | Path,
    scheme: QuantScheme,
    method: str = "rtn",
    data: DataSettings | None = None,
    evaluate_perplexity: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Quantize ``model`` with ``method`` and ``scheme``; write the checkpoint and report to ``output``.

    Returns the run report (also written as ``report.json``): settings, seed, model, data,
    perplexity before and after (when ``evaluate_perplexity``), seconds per stage, peak RSS.
    The output folder appears only when everything succeeded.
    """
    if method not in METHODS:
        raise LrquantError(f"unknown method '{method}'; available: {', '.join(sorted(METHODS))}")
    data = data or DataSettings()
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
        windows = evaluation_data(loaded, data) if evaluate_perplexity else None
        perplexities: dict[str, float] = {}
        if windows is not None:
            log(f"full-precision perplexity on {windows.shape[0]} windows of {data.seqlen} tokens")
            perplexities["fp"] = perplexity(loaded.model, windows, data.batch_size, "fp perplexity")
            lap("eval_fp")
        log(f"quantizing with {method} at {scheme.name}")
        METHODS[method](loaded.model, loaded.arch, scheme)
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
            "scheme": scheme.name,
            "settings": scheme.model_dump(),
            "model": {
                "name": model,
                "path": str(loaded.path),
                "model_type": loaded.model_type,
                "parameters": loaded.num_parameters,
            },
            "data": {
                "calibration": None,  # round-to-nearest uses no calibration data
                "evaluation": data.eval,
                "seqlen": data.seqlen,
                "nsamples": data.nsamples,
                "eval_windows": None if windows is None else windows.shape[0],
            },
            "seed": data.seed,
            "perplexity": perplexities,
            "seconds": {**seconds, "total": round(sum(seconds.values()), 2)},
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "environment": _environment(),
        }
        write_json(out.tmp / REPORT_FILE, report)
        out.commit()
    log(f"wrote {out.final}")
    return report
