"""The ``lrquant`` command: a thin layer over :mod:`lrquant.api`, one function per subcommand."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from typing import NoReturn

from lrquant.console import show_progress_lines
from lrquant.errors import LrquantError

DEFAULT_MODEL = "smollm2-135m"


def _windows(value: str) -> int | None:
    if value == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got '{value}'") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {count})")
    return count


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"built-in name, local HF folder (safetensors) or .gguf file (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the folder")
    parser.add_argument(
        "--device",
        default="auto",
        help="where blocks are learned and the model evaluated: auto (a CUDA GPU when there is one), "
        "cpu, cuda or cuda:N; the model itself stays in host memory (default: auto)",
    )


def _add_gguf_type_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gguf-type",
        default=None,
        metavar="TYPES",
        help="GGUF types: one for every quantized linear (or one of llama.cpp's mixes Q3_K_M Q3_K_L Q4_K_S "
        "Q4_K_M Q5_K_S Q5_K_M) and/or PATTERN=TYPE per tensor, comma-separated, e.g. "
        "Q4_K,blk.*.ffn_down=Q6_K,token_embd=Q8_0 (types Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K "
        "F16 F32 BF16; default: the type that holds the grid exactly, else the K-quant of its width; "
        "export: the types the output was quantized for)",
    )


def _add_data_args(parser: argparse.ArgumentParser, eval_flag: str) -> None:
    parser.add_argument(
        eval_flag,
        dest="eval_data",
        default=None,
        help="evaluation data. Text: file, folder, .jsonl, or wikipedia[:train|:test] (default: "
        "wikipedia:test). Images: comma-separated sets, each a folder (class subfolders for "
        "labels) or photos, photos:heldout, digits, lfw (digits:N, lfw:N: a seeded N of them), "
        "with an optional @SIZE (default: "
        "photos:heldout,digits@112,lfw@112). Vision-language models: image-text pairs, a folder "
        '(each image with a .txt of the same name), a .jsonl of {"image", "text"} lines, or the '
        "built-in digits-words:test (the default; a task with answers: accuracy is reported)",
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="input resolution of a vision model (default: its own)"
    )
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument(
        "--eval-windows",
        type=_windows,
        default=32,
        help="evaluation windows: a number or 'all' (default: 32)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass in evaluation")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl files")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other user error (subparsers inherit this class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lrquant: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for all subcommands."""
    parser = _Parser(prog="lrquant", description="Post-training quantization of transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write a checkpoint with a run report")
    _add_model_args(q)
    q.add_argument("--output", help="output folder (written atomically; required unless --explain)")
    q.add_argument(
        "--method",
        default="auto",
        help="auto (LRQuant+ with what measured best for the setting and the model, by each "
        "modality's rules in src/lrquant/modalities/), lrquant_plus (the paper's method exactly), "
        "lrquant, omniquant, smoothquant, gptq or rtn (default: auto)",
    )
    q.add_argument(
        "--explain",
        action="store_true",
        help="print the recipe that would run and why, and stop (nothing is written)",
    )
    q.add_argument("--preset", default="default", help="budget: fast, default or paper (default: default)")
    q.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set epochs=3 --set rotation=false (repeatable)",
    )
    q.add_argument("--wbits", type=int, default=4, help="weight bits: 2-8, or 16 for none (default: 4)")
    q.add_argument("--abits", type=int, default=16, help="activation bits: 2-8, or 16 for none (default: 16)")
    q.add_argument("--group-size", type=int, default=None, help="weight group size (default: per channel)")
    q.add_argument("--w-symmetric", action="store_true", help="symmetric weight grid (default: asymmetric)")
    q.add_argument("--a-symmetric", action="store_true", help="symmetric activation grid")
    q.add_argument(
        "--a-clip",
        type=float,
        default=1.0,
        help="activation clipping: each token's grid spans this fraction (0.5-1) of its min and max, "
        "for every linear input (default: 1, no clipping)",
    )
    q.add_argument("--qkv-bits", type=int, default=None, help="bits of Q, K, V after RoPE (default: --abits)")
    q.add_argument("--softmax-bits", type=int, default=16, help="bits of the softmax output (default: 16)")
    q.add_argument(
        "--rotate-qkv",
        action="store_true",
        help="rotate each head of Q, K, V by a fixed Hadamard matrix before quantizing them (exact "
        "without quantization; finer 4-bit grids)",
    )
    q.add_argument(
        "--post-act-bits",
        type=int,
        default=None,
        help="bits of the MLP activation output, the input of its second linear (default: --abits)",
    )
    q.add_argument(
        "--quantize-head",
        action="store_true",
        help="also quantize the LM head or classifier, round-to-nearest (default: full precision)",
    )
    q.add_argument(
        "--quantize-patch-embed",
        action="store_true",
        help="also quantize a vision model's patch embedding weight, round-to-nearest at --wbits "
        "(default: full precision)",
    )
    q.add_argument(
        "--quantize-projector",
        action="store_true",
        help="also quantize a vision-language model's projector at --wbits/--abits, round-to-nearest "
        "(default: full precision)",
    )
    q.add_argument(
        "--quantize-vision",
        action="store_true",
        help="also quantize a vision-language model's vision tower, first, with the recipe rules of "
        "a vision transformer (default: the tower stays in full precision)",
    )
    q.add_argument(
        "--vision-wbits", type=int, default=None, help="the vision tower's weight bits (default: --wbits)"
    )
    q.add_argument(
        "--vision-abits", type=int, default=None, help="the vision tower's activation bits (default: --abits)"
    )
    q.add_argument(
        "--calib-data",
        default=None,
        help="calibration data: text as for --eval-data (default: wikipedia:train), images: a "
        "folder or the built-in photos (default: photos), or image-text pairs for a "
        "vision-language model (as for --eval-data; default: digits-words:train)",
    )
    q.add_argument(
        "--nsamples",
        type=int,
        default=None,
        help="calibration windows or images (default: the preset's windows, or 32 images)",
    )
    q.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    q.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    q.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder that lrquant wrote"
    )
    q.add_argument(
        "--format",
        dest="export_format",
        default=None,
        help="also pack the output for an engine: compressed-tensors (vLLM) or gguf (llama.cpp), "
        "written beside --output (OUTPUT-compressed-tensors/, OUTPUT.gguf); with gguf, each linear "
        "learns the grid of the GGUF type it is written as (see --gguf-type)",
    )
    _add_gguf_type_arg(q)
    q.add_argument(
        "--stream",
        choices=("auto", "on", "off"),
        default="auto",
        help="load a language model's blocks one at a time from its safetensors files, never the "
        "whole model (auto, the default: when it would take most of the free memory in float32)",
    )
    q.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="memory the calibration activations may take (e.g. 8GiB); past it they are kept in "
        "memory-mapped files in the run's resume folder (default: half the memory available when "
        "the block-wise pass starts)",
    )
    _add_data_args(q, "--eval-data")
    q.set_defaults(func=cmd_quantize)

    x = sub.add_parser("export", help="pack a quantized output folder for an engine, from its integer codes")
    x.add_argument("source", metavar="OUTPUT", help="a folder that `lrquant quantize --output` wrote")
    x.add_argument(
        "--format",
        required=True,
        help="compressed-tensors (a folder: vLLM, llm-compressor, transformers) or gguf (one file: "
        "llama.cpp, Ollama, LM Studio)",
    )
    x.add_argument("--output", default=None, help="where to write (default: beside OUTPUT, named after it)")
    _add_gguf_type_arg(x)
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export that lrquant wrote")
    x.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    x.set_defaults(func=cmd_export)

    e = sub.add_parser(
        "eval", help="perplexity (text) or feature cosine and accuracy (images) of a model or output folder"
    )
    _add_model_args(e)
    _add_data_args(e, "--data")
    e.add_argument(
        "--reference",
        default=None,
        help="full-precision model to compare with: a language model's KL divergence and top-1 "
        "agreement, a vision model's feature cosine and probes (default: the model a quantized "
        "folder was made from)",
    )
    _add_backend_arg(e, "fake")
    e.add_argument(
        "--stream",
        action="store_true",
        help="score a language model (and its reference) one block at a time, never whole in memory",
    )
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="continue a prompt with a model or output, streaming the text")
    _add_model_args(g)
    g.set_defaults(device="cpu")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    _add_backend_arg(g, "auto")
    g.add_argument("--json", action="store_true", help="print the result as JSON instead of streaming")
    g.set_defaults(func=cmd_generate)
    return parser


def _add_backend_arg(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--backend",
        default=default,
        help="how a quantized output's linears run: packed (real int4/int8 CPU kernels), fake "
        f"(simulated, exactly as evaluated when quantizing) or auto (packed where a kernel exists) "
        f"(default: {default})",
    )


def _data_settings(args: argparse.Namespace):
    from lrquant.api import DataSettings

    return DataSettings(
        calib=getattr(args, "calib_data", None),
        eval=args.eval_data,
        seqlen=args.seqlen,
        nsamples=getattr(args, "nsamples", None),
        eval_windows=args.eval_windows,
        text_field=args.text_field,
        seed=getattr(args, "seed", 0),
        batch_size=args.batch_size,
        image_size=args.image_size,
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    """``lrquant quantize`` (and, with ``--format``, ``lrquant export`` of its output)."""
    from lrquant import api
    from lrquant.config import build_scheme
    from lrquant.methods.activations import parse_size
    from lrquant.recipes import parse_overrides

    scheme = build_scheme(
        wbits=args.wbits,
        abits=args.abits,
        group_size=args.group_size,
        w_symmetric=args.w_symmetric,
        a_symmetric=args.a_symmetric,
        qkv_bits=args.qkv_bits,
        softmax_bits=args.softmax_bits,
        post_act_bits=args.post_act_bits,
        a_clip=args.a_clip,
        rotate_qkv=args.rotate_qkv,
        head=args.quantize_head,
        patch_embed=args.quantize_patch_embed,
        projector=args.quantize_projector,
    )
    if args.explain:
        return _explain(args, scheme)
    if args.output is None:
        raise LrquantError("quantize needs --output FOLDER (or --explain to only print the recipe)")
    report = api.quantize(
        args.model,
        args.output,
        scheme=scheme,
        method=args.method,
        preset=args.preset,
        overrides=parse_overrides(args.overrides),
        data=_data_settings(args),
        run_eval=not args.no_eval,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
        format=args.export_format,
        gguf_type=args.gguf_type,
        vision_scheme=_vision_scheme(args, scheme),
        stream={"auto": None, "on": True, "off": False}[args.stream],
        max_memory=None if args.max_memory is None else parse_size(args.max_memory),
    )
    if "process" in report:  # a process other than 0 under torchrun: process 0 reports
        return 0
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        if "images" in report:
            summary = "; ".join(f"{k}: {_image_summary(v)}" for k, v in report["images"].items())
            summary = summary or "not evaluated"
        else:
            ppl = report["perplexity"]
            summary = "perplexity " + (", ".join(f"{k} {v:.3f}" for k, v in ppl.items()) or "not evaluated")
            if "fidelity" in report:
                summary += f"; {_fidelity(report['fidelity'])}"
            if "accuracy" in report:
                summary += "; accuracy " + ", ".join(
                    f"{k} {100 * v:.1f} %" for k, v in report["accuracy"].items()
                )
        tower = f", vision tower {report['vision']['scheme']}" if "vision" in report else ""
        print(
            f"{report['method']} {report['scheme']}{tower}: {summary}; "
            f"{report['seconds']['total']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MiB -> {args.output}"
        )
    if "export" in report and not args.json:
        print(_export_summary(report["export"]))
    return 0


def _vision_scheme(args: argparse.Namespace, scheme):
    """The vision tower's scheme with ``--quantize-vision`` (the language model's, at
    ``--vision-wbits``/``--vision-abits`` when given; Q, K, V and the MLP activation output then
    follow ``--vision-abits``), else None."""
    from lrquant.config import build_scheme

    if not args.quantize_vision:
        for flag, value in (("--vision-wbits", args.vision_wbits), ("--vision-abits", args.vision_abits)):
            if value is not None:
                raise LrquantError(f"{flag} sets the vision tower's bits: give it with --quantize-vision")
        return None
    if args.vision_wbits is None and args.vision_abits is None:
        return scheme.model_copy(update={"head": False, "patch_embed": False, "projector": False})
    abits = args.vision_abits if args.vision_abits is not None else args.abits
    follow = args.vision_abits is not None  # Q, K, V and the MLP output follow the tower's abits
    return build_scheme(
        wbits=args.vision_wbits if args.vision_wbits is not None else args.wbits,
        abits=abits,
        group_size=args.group_size,
        w_symmetric=args.w_symmetric,
        a_symmetric=args.a_symmetric,
        qkv_bits=None if follow else args.qkv_bits,
        softmax_bits=args.softmax_bits,
        post_act_bits=None if follow else args.post_act_bits,
        a_clip=args.a_clip,
        rotate_qkv=args.rotate_qkv,
    )


def _explain(args: argparse.Namespace, scheme) -> int:
    from lrquant import api
    from lrquant.recipes import parse_overrides

    plan = api.explain(
        args.model,
        scheme,
        args.method,
        args.preset,
        parse_overrides(args.overrides),
        args.export_format,
        args.trust_remote_code,
        _vision_scheme(args, scheme),
    )
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    print(f"{plan['method']} at {plan['scheme']}, preset {plan['preset']}")
    _print_plan(plan)
    if "vision" in plan:
        print(f"vision tower at {plan['vision']['scheme']}:")
        _print_plan(plan["vision"], "  ")
    return 0


def _print_plan(plan: dict, indent: str = "") -> None:
    if "rule" in plan:
        print(f"{indent}rule: {plan['rule']['when']}")
        print(f"{indent}why: {plan['rule']['why']}")
    changed = plan["differs_from_lrquant_plus"]
    print(
        f"{indent}against LRQuant+ as published: "
        + (" ".join(f"{key}={value}" for key, value in changed.items()) or "the same")
    )
    print(f"{indent}recipe: " + " ".join(f"{key}={value}" for key, value in plan["recipe"].items()))


def cmd_export(args: argparse.Namespace) -> int:
    """``lrquant export``."""
    from lrquant import api

    result = api.export(
        args.source, args.format, args.output, overwrite=args.overwrite, gguf_type=args.gguf_type
    )
    print(json.dumps(result, indent=2) if args.json else _export_summary(result))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """``lrquant generate``: the continuation streams to stdout, the speeds follow on stderr."""
    from lrquant import api

    result = api.generate(
        args.model,
        args.prompt,
        args.max_new_tokens,
        args.backend,
        args.device,
        args.trust_remote_code,
        echo=not args.json,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        decode = result["decode_tokens_per_s"]
        print(
            f"lrquant: {result['scheme']} on {result['backend']}: prefill {result['prompt_tokens']} "
            f"tokens at {result['prefill_tokens_per_s']:.1f} tokens/s, {result['new_tokens']} new tokens"
            + (f" at {decode:.1f} tokens/s" if decode else ""),
            file=sys.stderr,
        )
    return 0


def _export_summary(result: dict) -> str:
    return (
        f"{result['scheme']} as {result['format']}: {result['bytes'] / 2**20:.1f} MiB, "
        f"{result['seconds']:.1f} s -> {result['path']}"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    """``lrquant eval``."""
    from lrquant import api

    result = api.evaluate(
        args.model,
        _data_settings(args),
        trust_remote_code=args.trust_remote_code,
        reference=args.reference,
        device=args.device,
        backend=args.backend,
        stream=args.stream,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    elif "images" in result:
        against = result["reference"] or "itself"
        print(f"{result['model']} ({result['scheme']}) against {against}: {_image_summary(result['images'])}")
    else:
        against = f"; against {result['reference']}: {_fidelity(result)}" if "kl" in result else ""
        from lrquant.modalities.text import scored_samples

        scheme = result["scheme"] + (
            f", vision tower {result['vision_scheme']}" if "vision_scheme" in result else ""
        )
        accuracy = f", accuracy {100 * result['accuracy']:.1f} %" if "accuracy" in result else ""
        print(
            f"{result['model']} ({scheme}): perplexity {result['perplexity']:.3f}{accuracy} on "
            f"{scored_samples(result)} from {result['data']}{against}"
        )
    return 0


def _fidelity(scores: dict) -> str:
    """``KL 0.0421, top-1 agreement 91.3 %`` from an evaluation against full precision."""
    return f"KL {scores['kl']:.4f}, top-1 agreement {100 * scores['top1_agreement']:.1f} %"


def _image_summary(sets: dict[str, dict]) -> str:
    """``photos:heldout cos 0.998, digits@112 probe 95.3 %`` from a vision evaluation."""
    parts = []
    for name, row in sets.items():
        text = f"{name} cos {row['cosine']:.4f}"
        for key, label in (("top1", "top-1"), ("probe_accuracy", "probe")):
            if key in row:
                text += f" {label} {row[key]:.1f} %"
        parts.append(text)
    return ", ".join(parts)


class Stopped(KeyboardInterrupt):
    """A termination signal, raised where the program is, so it unwinds as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP (``kill``, ``timeout``, a batch scheduler's preemption, a closed
    terminal) into :class:`Stopped`, so the temporary output folder is removed and the finished
    blocks are kept, as after Ctrl-C. Later signals are ignored while that cleanup runs."""
    wanted = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    if threading.current_thread() is not threading.main_thread():  # handlers belong to the main thread
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        for sig in wanted:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors print one line and exit with status 2."""
    args = build_parser().parse_args(argv)
    show_progress_lines()
    try:
        with stop_on_signals():
            return args.func(args)
    except LrquantError as err:
        group = sys.modules.get("lrquant.distributed")  # imported by a run (it imports torch)
        if group is not None and group.world() > 1 and not str(err).startswith("process "):
            err = LrquantError(f"process {group.rank()}: {err}")
        print(f"lrquant: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if type(err).__name__ != "OutOfMemoryError":  # torch.cuda's, named so torch loads lazily
            raise
        print(
            f"lrquant: error: out of GPU memory ({str(err).splitlines()[0]}); "
            "use --device cpu, fewer --nsamples or a shorter --seqlen (a learned run keeps its "
            "finished blocks: rerun to resume)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as stop:
        if isinstance(stop, Stopped):
            signum, how = stop.signum, f"stopped by {signal.Signals(stop.signum).name}"
        else:
            signum, how = signal.SIGINT, "interrupted"
        print(
            f"lrquant: {how}; no output was written (a learned run keeps its finished blocks: "
            "rerun the same command to resume)",
            file=sys.stderr,
        )
        return 128 + signum
    finally:
        if "lrquant.distributed" in sys.modules:
            sys.modules["lrquant.distributed"].stop()


if __name__ == "__main__":
    sys.exit(main())
