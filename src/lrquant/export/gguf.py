"""GGUF export (llama.cpp, Ollama, LM Studio) of a quantized output, bit-exact on lrquant's grid.

A GGUF block of 32 weights holds integers ``q`` and an fp16 step ``d`` (and, for the ``_1`` types,
an fp16 minimum ``m``): ``Q4_0``/``Q5_0`` give ``w = d·(q − 8)``/``d·(q − 16)``, ``Q8_0`` gives
``w = d·q``, ``Q4_1``/``Q5_1`` give ``w = d·q + m``. When every group of lrquant's grid
``w = s·(c − z)`` is a whole number of 32-weight blocks, each block takes its group's ``s`` as
``d`` (and ``s·(c_min − z)`` as ``m``) and the codes are copied, so only the fp16 rounding of
``d`` and ``m`` differs from the quantized model. Tensor names, metadata, the tokenizer and the
q/k row order follow llama.cpp's ``convert_hf_to_gguf.py``.

Matrices that were not quantized (embedding, an unquantized head) are F16, as the converter
writes a float32 model by default: half the bytes of F32, for the same 2^-11 relative rounding
that the blocks' steps already carry; BF16 ones stay BF16 (exact). Norms and biases are F32, the
only type llama.cpp takes for them.
"""

from __future__ import annotations

import fnmatch
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from lrquant.arch.vision_language import VISION_LANGUAGE_TYPES
from lrquant.config import QuantScheme, QuantSpec
from lrquant.console import log
from lrquant.errors import LrquantError
from lrquant.export import IntegerLinear, QuantizedOutput, language_model_of
from lrquant.export.gguf_fit import FALLBACK, GRID_TYPES, Fit, GridType, Learned, fit, pack
from lrquant.quant.quantizer import integer_range

BLOCK = 32  # weights per block of every non-K GGUF type

# model_type -> (GGUF architecture, whether q/k rows are reordered for llama.cpp's rope)
ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),  # llama.cpp runs Mistral as llama
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),  # NeoX rope: HF's row order as it is
}

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = ("F32", "F16", "BF16")

# (bits, symmetric) of lrquant's grid -> the legacy type that holds it exactly with the fewest bytes
EXACT_TYPES: dict[tuple[int, bool], str] = {
    (4, True): "Q4_0",
    (4, False): "Q4_1",
    (5, True): "Q5_0",
    (5, False): "Q5_1",
    (8, True): "Q8_0",
}
# code bits -> the type a grid without an exact one is fitted to
FITTED_TYPES = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 7: "Q8_0", 8: "Q8_0"}

# the file type llama.cpp reports, by the type most quantized weights take
FILE_TYPES = {
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K,
    "Q3_K": gguf.LlamaFileType.MOSTLY_Q3_K_S,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
}
TYPE_NAMES = (*GRID_TYPES, *FLOAT_TYPES)  # and the llama.cpp mixes of PRESETS


@dataclass(frozen=True)
class TypeRules:
    """Which GGUF type each tensor takes: ``default`` for every quantized linear (None: the type
    its grid maps to), then ``(pattern, type)`` pairs over GGUF tensor names without ``.weight``
    (fnmatch globs, e.g. ``blk.*.ffn_down``), a later pair overriding an earlier one."""

    default: str | None = None
    rules: tuple[tuple[str, str], ...] = ()
    preset: str | None = None  # a llama.cpp mix (Q4_K_M, ...), expanded per model by preset_rules

    def type_of(self, name: str) -> str | None:
        chosen = None
        for pattern, qtype in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                chosen = qtype
        return chosen


def _type_name(text: str, item: str) -> str:
    name = text.strip().upper()
    if name not in TYPE_NAMES:
        raise LrquantError(
            f"unknown GGUF type '{text.strip()}' in --gguf-type item '{item.strip()}': choose one of "
            + ", ".join((*TYPE_NAMES, *PRESETS))
        )
    return name


def parse_type_rules(text: str | None) -> TypeRules:
    """``--gguf-type``: ``TYPE``, ``PATTERN=TYPE`` items or both, comma-separated
    (``Q4_K,blk.*.ffn_down=Q6_K,token_embd=Q8_0``); refused in one line when malformed."""
    if text is None:
        return TypeRules()
    default, rules, preset = None, [], None
    for item in text.split(","):
        if not item.strip():
            raise LrquantError(
                f"--gguf-type '{text}' has an empty item: give TYPE or PATTERN=TYPE items separated by commas"
            )
        pattern, equals, qtype = item.rpartition("=")
        if not equals:
            if default is not None or preset is not None or rules:
                raise LrquantError(
                    f"--gguf-type '{text}': a type without a pattern ('{item.strip()}') must come first, "
                    "once; give the others as PATTERN=TYPE"
                )
            if item.strip().upper() in PRESETS:
                preset = item.strip().upper()
            else:
                default = _type_name(item, item)
            continue
        pattern = pattern.strip().removesuffix(".weight")
        if not pattern:
            raise LrquantError(f"--gguf-type item '{item.strip()}' has no tensor pattern before '='")
        rules.append((pattern, _type_name(qtype, item)))
    return TypeRules(default, tuple(rules), preset)


# llama.cpp's K-quant mixes, as llama_tensor_get_type (llama-quant.cpp) chooses for dense models
# (not Falcon, no experts, no importance matrix): a base type, and the type of attn_v, ffn_down and
# attn_output in layer i of n (None: the base type); the output matrix, or a tied embedding, takes
# Q6_K. Q2_K and Q3_K_S are not among them: given to --gguf-type, those name the type itself.
def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


Choice = Callable[[int, int], str | None]


def _six_where_more_bits(i: int, n: int) -> str | None:
    return "Q6_K" if _more_bits(i, n) else None


PRESETS: dict[str, tuple[str, Choice, Choice, Choice]] = {
    "Q3_K_M": (
        "Q3_K",
        lambda i, n: "Q5_K" if i < 2 else "Q4_K",
        lambda i, n: "Q5_K" if i < n // 16 else "Q4_K",
        lambda i, n: "Q4_K",
    ),
    "Q3_K_L": ("Q3_K", lambda i, n: "Q5_K", lambda i, n: "Q5_K", lambda i, n: "Q5_K"),
    "Q4_K_S": (
        "Q4_K",
        lambda i, n: "Q5_K" if i < 4 else None,
        lambda i, n: "Q5_K" if i < n // 8 else None,
        lambda i, n: None,
    ),
    "Q4_K_M": ("Q4_K", _six_where_more_bits, _six_where_more_bits, lambda i, n: None),
    "Q5_K_S": ("Q5_K", lambda i, n: None, lambda i, n: None, lambda i, n: None),
    "Q5_K_M": ("Q5_K", _six_where_more_bits, _six_where_more_bits, lambda i, n: None),
}


def preset_rules(rules: TypeRules, config: dict, matrices: dict[str, int]) -> TypeRules:
    """``rules`` with its llama.cpp mix spelt out for this model: the mix's base type as the
    default, one rule per tensor it changes, then the user's own rules (which override)."""
    if rules.preset is None:
        return rules
    base, *choices = PRESETS[rules.preset]
    layers = config["num_hidden_layers"]
    spelt = [("output" if "output" in matrices else "token_embd", "Q6_K")]
    for role, choose in zip(("attn_v", "ffn_down", "attn_output"), choices, strict=True):
        spelt += [(f"blk.{i}.{role}", t) for i in range(layers) if (t := choose(i, layers)) is not None]
    return TypeRules(base, (*spelt, *rules.rules))


def refuse_scheme(scheme: QuantScheme) -> None:
    """GGUF holds weights only: a scheme that quantizes activations is refused; so is a quantized
    projector (the file holds a vision-language model's language model alone)."""
    if scheme.quantizes_activations:
        raise LrquantError(
            f"{scheme.name} quantizes activations, but GGUF holds weights only: llama.cpp would run "
            "them in full precision, not as evaluated; quantize weights only (without --abits, the "
            "default 16) for GGUF"
        )
    if scheme.projector:
        raise LrquantError(
            "GGUF holds the language model alone (llama.cpp reads the projector from an mmproj file, "
            "which this writer does not make), so the quantized projector would be left out: leave "
            "out --quantize-projector for GGUF, or use --format compressed-tensors"
        )


def _refuse_config(config: dict) -> None:
    """Refuse, in one line, a model a GGUF file cannot hold or this writer does not write yet."""
    model_type = str(config.get("model_type"))
    if model_type not in ARCHITECTURES:
        raise LrquantError(
            f"GGUF export supports {', '.join(ARCHITECTURES)} models, not '{model_type}': "
            "export this output with --format compressed-tensors instead"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise LrquantError(
            f"GGUF export does not write rope scaling yet (this model uses '{rope_type}'): export it "
            "with --format compressed-tensors instead"
        )


def _permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rope pairs adjacent dimensions where HF pairs the two halves of each head, so
    convert_hf_to_gguf.py interleaves each head's halves; whole rows move, codes with their steps."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rope_order(linear: IntegerLinear, heads: int) -> IntegerLinear:
    """The linear with its output rows in llama.cpp's rope order."""
    bias = None if linear.bias is None else _permute_rows(linear.bias, heads)
    return IntegerLinear(
        codes=_permute_rows(linear.codes, heads),
        scale=_permute_rows(linear.scale, heads),
        zero=_permute_rows(linear.zero, heads),
        bias=bias,
        bits=linear.bits,
        symmetric=linear.symmetric,
        group_size=linear.group_size,
    )


def _float_matrix(tensor: torch.Tensor, qtype: str, name: str) -> np.ndarray:
    """The tensor ``name`` stored as F32, F16 or BF16."""
    if qtype == "F32":
        return tensor.float().numpy()
    if qtype == "BF16":
        return gguf.quants.quantize(tensor.float().numpy(), Q.BF16)
    half = tensor.half().numpy()
    if not np.isfinite(half).all():
        raise LrquantError(f"'{name}' has values beyond the fp16 range: give it --gguf-type NAME=BF16 or F32")
    return half


def _fp16(values: np.ndarray, name: str, what: str) -> np.ndarray:
    """``values`` as the fp16 that GGUF blocks store, refused when fp16 cannot hold them."""
    half = values.astype(np.float16)
    if not np.isfinite(half).all() or ((half == 0) & (values != 0)).any():
        raise LrquantError(
            f"'{name}' has a {what} outside the fp16 range of GGUF blocks: it cannot be exported"
        )
    return half


def _per_piece(linear: IntegerLinear, piece: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The learned step and zero of each run of ``piece`` inputs, ``[out, in / piece]``, or None
    when a run would straddle two groups."""
    inputs = linear.codes.shape[1]
    size = linear.group_size or inputs
    if size % piece:
        return None
    group = torch.arange(inputs // piece) * piece // size
    return linear.scale[:, group].double().numpy(), linear.zero[:, group].double().numpy()


def exact_fit(linear: IntegerLinear, t: GridType, name: str) -> Fit | None:
    """The learned codes as a legacy type's blocks, each taking its group's step (fp16): None
    when a block straddles two groups or a code falls outside the type's range."""
    out, inputs = linear.codes.shape
    grid = _per_piece(linear, BLOCK) if t.scale_bits is None else None
    if grid is None:
        return None
    step, zero = grid
    codes = linear.codes.reshape(out, -1, BLOCK).to(torch.int32).numpy()
    low, _ = integer_range(linear.bits, linear.symmetric)
    if t.symmetric:  # w = s·(c − z), z an integer
        q = codes - np.rint(zero).astype(np.int32)[..., None]
        minimum = np.zeros_like(step)
    else:  # w = s·(c − low) − s·(z − low)
        q = codes - low
        minimum = step * (zero - low)
    if q.min() < t.low or q.max() > t.high:
        return None
    step16 = _fp16(step, name, "step").astype(np.float32)
    min16 = _fp16(minimum, name, "block minimum").astype(np.float32)
    return Fit(q.reshape(out, inputs), step16, min16)


def fitted(linear: IntegerLinear, t: GridType) -> Fit:
    """Type ``t`` fitted to the learned weight, the learned grid kept where ``t`` holds it."""
    pieces = _per_piece(linear, t.sub)
    low, high = integer_range(linear.bits, linear.symmetric)
    learned = None if pieces is None else Learned(pieces[0], pieces[1], low, high)
    return fit(linear.dequantized().double().numpy(), t, learned)


def _whole_blocks(spec: QuantSpec) -> bool:
    """Whether every group of ``spec`` is a whole number of 32-weight legacy blocks."""
    return spec.group_size is None or spec.group_size % BLOCK == 0


def natural_type(spec: QuantSpec) -> str:
    """The type a grid maps to: the legacy type that holds it code for code, else the K-quant
    (or Q8_0) it is fitted to."""
    exact = EXACT_TYPES.get((spec.bits, spec.symmetric)) if _whole_blocks(spec) else None
    return exact or FITTED_TYPES[spec.bits]


def _plan(
    spec: QuantSpec, names: dict[str, str], matrices: dict[str, int], rules: TypeRules
) -> dict[str, str]:
    """Each matrix's type: its rule, else (a quantized linear, one of ``names``) ``rules.default``
    or the type the grid ``spec`` maps to, else (a float matrix) None; a K-quant on rows that are
    not whole super-blocks falls back as llama.cpp's quantizer does, and the refusals come first."""
    for pattern, _ in rules.rules:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in matrices):
            some = ", ".join(list(matrices)[:3])
            raise LrquantError(
                f"--gguf-type pattern '{pattern}' matches no matrix of this model (names look like {some})"
            )
    natural = natural_type(spec)
    types, fallbacks = {}, {}
    for name, inputs in matrices.items():
        qtype = rules.type_of(name) or (rules.default or natural if name in names else None)
        if qtype in FALLBACK and inputs % GRID_TYPES[qtype].block:
            fallbacks.setdefault((qtype, FALLBACK[qtype]), []).append(inputs)
            qtype = FALLBACK[qtype]
        if qtype in GRID_TYPES and inputs % BLOCK:
            raise LrquantError(
                f"'{name}' has {inputs} inputs, not whole 32-weight GGUF blocks: this model cannot take "
                f"{qtype}; export it with --format compressed-tensors, or give that tensor F16"
            )
        types[name] = qtype
    for (wanted, taken), widths in fallbacks.items():
        log(
            f"{len(widths)} matrices have rows of {sorted(set(widths))} weights, not whole 256-weight "
            f"super-blocks: {taken} instead of {wanted} for them, as llama.cpp's quantizer does"
        )
    return types


def _name_map(config: dict, arch: gguf.MODEL_ARCH) -> Callable[[str], str]:
    """The GGUF name of a tensor key: ``model.layers.0.mlp.down_proj.weight`` -> ``blk.0.ffn_down.weight``."""
    names = gguf.TensorNameMap(arch, config["num_hidden_layers"])

    def gguf_name(key: str) -> str:
        mapped = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise LrquantError(
                f"'{key}' has no GGUF tensor name: this model variant cannot be exported to GGUF"
            )
        return mapped

    return gguf_name


def _tensor_types(
    config: dict,
    gguf_name: Callable[[str], str],
    spec: QuantSpec,
    linears: dict[str, int],
    floats: dict[str, int],
    rules: TypeRules,
) -> tuple[dict[str, str], dict[str, str]]:
    """The GGUF base name of each quantized linear (``{gguf base: module name}``) and the type of
    every matrix by its base name, from the row lengths of the ``linears`` (by module name) and of
    the other matrices (``floats``, by tensor key)."""
    bases = {gguf_name(f"{name}.weight").removesuffix(".weight"): name for name in linears}
    matrices = {base: linears[name] for base, name in bases.items()}
    for key, inputs in floats.items():
        matrices[gguf_name(key).removesuffix(".weight")] = inputs
    return bases, _plan(spec, bases, matrices, preset_rules(rules, config, matrices))


def learned_grids(
    scheme: QuantScheme,
    config: dict,
    linears: dict[str, int],
    floats: dict[str, int],
    gguf_type: str | None,
) -> QuantScheme:
    """``scheme`` with the weight grid of each linear set to what its GGUF type stores, so the
    learner learns the grid the file will hold: ``scheme.weight`` where the type holds it code for
    code, else the type's own (its code bits, symmetry and sub-block as the group, e.g. Q6_K:
    6 bits, symmetric, groups of 16), and no quantization for a float type. ``linears`` and
    ``floats`` are the row lengths of the quantized linears (by module name) and of the other
    matrices (by tensor key)."""
    _refuse_config(config)
    refuse_scheme(scheme)
    rules = parse_type_rules(gguf_type)
    gguf_name = _name_map(config, ARCHITECTURES[config["model_type"]][0])
    bases, types = _tensor_types(config, gguf_name, scheme.weight, linears, floats, rules)
    grids = {}
    for base, name in bases.items():
        qtype = types[base]
        if qtype in FLOAT_TYPES:
            grids[name] = QuantSpec()
            continue
        t = GRID_TYPES[qtype]
        if not _holds(t, scheme.weight):
            grids[name] = QuantSpec(bits=t.bits, symmetric=t.symmetric, granularity="group", group_size=t.sub)
    changed = Counter(
        f"{types[base]} ({_grid_label(grids[name])})" for base, name in bases.items() if name in grids
    )
    if changed:
        log(
            f"learning the grids of their GGUF types for {sum(changed.values())} of {len(bases)} linears: "
            + ", ".join(f"{n} x {label}" for label, n in changed.most_common())
        )
    return scheme.model_copy(update={"weight_grids": grids, "gguf_type": gguf_type})


def _grid_label(spec: QuantSpec) -> str:
    if not spec.enabled:
        return "not quantized"
    size = f"groups of {spec.group_size}" if spec.group_size else "per channel"
    return f"{spec.bits}-bit {'symmetric' if spec.symmetric else 'asymmetric'}, {size}"


def _holds(t: GridType, spec: QuantSpec) -> bool:
    """Whether type ``t`` stores the grid ``spec`` code for code (K-quants: the same sub-blocks)."""
    if (spec.bits, spec.symmetric) != (t.bits, t.symmetric):
        return False
    if t.scale_bits is None:
        return _whole_blocks(spec)
    return spec.group_size == t.sub


@dataclass(frozen=True)
class _Planned:
    """One tensor of the file: its GGUF name, shape (torch's order), type, and how to make its
    data (read and packed only when it is written)."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size

    def add_info(self, writer: gguf.GGUFWriter) -> None:
        if self.qtype in (Q.F32, Q.F16):
            dtype = np.float32 if self.qtype == Q.F32 else np.float16
            writer.add_tensor_info(self.name, self.shape, np.dtype(dtype), self.nbytes)
        else:  # packed bytes
            shape = gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype)
            writer.add_tensor_info(self.name, shape, np.dtype(np.uint8), self.nbytes, raw_dtype=self.qtype)


def _float_type(shape: tuple[int, ...], dtype: torch.dtype) -> str:
    """How convert_hf_to_gguf.py stores an unquantized tensor: 1-D ones (norms, biases) in F32,
    which llama.cpp expects, matrices in BF16 when saved so (exact) and in F16 otherwise."""
    if len(shape) == 1:
        return "F32"
    return "BF16" if dtype == torch.bfloat16 else "F16"


def _gguf_tensors(
    output: QuantizedOutput, arch: gguf.MODEL_ARCH, permute: bool, rules: TypeRules
) -> tuple[list[_Planned], list[str], set[str]]:
    """Every tensor of the file, by its GGUF name, in the order it is written: planned from the
    shapes alone, each read and packed when its turn comes (so export holds one tensor at a
    time); the type each quantized linear takes; and the set that collects, while writing, the
    types fitted rather than copied code for code."""
    config = output.config
    n_heads = config["num_attention_heads"]
    heads = {"q_proj": n_heads, "k_proj": config.get("num_key_value_heads", n_heads)}
    gguf_name = _name_map(config, arch)
    floats = {
        key: output.tensor_meta(key)
        for key in output.tensors
        if not key.endswith("rotary_emb.inv_freq")  # recomputed from the rope metadata
    }
    matrices = {
        key: shape[1] for key, (shape, _) in floats.items() if len(shape) == 2 and key.endswith(".weight")
    }
    shapes = {name: output.linear_shape(name) for name in output.linears}
    linear_rows = {name: shape[1] for name, shape in shapes.items()}
    linears, types = _tensor_types(config, gguf_name, output.scheme.weight, linear_rows, matrices, rules)

    planned, fitted_types = [], set()

    last: dict[str, IntegerLinear] = {}  # the linear read last: its bias is written next

    def linear_of(name: str) -> IntegerLinear:
        if name not in last:
            linear = output.linears[name]
            role = name.rsplit(".", 1)[-1]
            last.clear()
            last[name] = _rope_order(linear, heads[role]) if permute and role in heads else linear
        return last[name]

    def packed(name: str, qtype: str) -> np.ndarray:
        linear = linear_of(name)
        if qtype in FLOAT_TYPES:
            return _float_matrix(linear.dequantized(), qtype, name)
        t = GRID_TYPES[qtype]
        fit_ = exact_fit(linear, t, name)
        if fit_ is None:
            fit_ = fitted(linear, t)
            fitted_types.add(qtype)
        return pack(fit_, t)

    for base, name in linears.items():
        qtype = types[base]
        planned.append(
            _Planned(f"{base}.weight", shapes[name], _qtype(qtype), lambda n=name, q=qtype: packed(n, q))
        )
        if output.has_bias(name):
            planned.append(
                _Planned(
                    gguf_name(f"{name}.bias"),
                    (shapes[name][0],),
                    Q.F32,
                    lambda n=name: _float_matrix(linear_of(n).bias, "F32", f"{n}.bias"),
                )
            )
    for key, (shape, dtype) in floats.items():
        gname = gguf_name(key)
        qtype = types.get(gname.removesuffix(".weight")) or _float_type(shape, dtype)

        def make(key=key, qtype=qtype) -> np.ndarray:
            tensor = output.tensors[key]
            if qtype in FLOAT_TYPES:
                return _float_matrix(tensor, qtype, key)
            t = GRID_TYPES[qtype]
            return pack(fit(tensor.double().numpy(), t), t)

        planned.append(_Planned(gname, shape, _qtype(qtype), make))
    return planned, [types[base] for base in linears], fitted_types


def _qtype(name: str) -> gguf.GGMLQuantizationType:
    """The GGML type of a type name (a float type or a grid type)."""
    return Q[name] if name in FLOAT_TYPES else GRID_TYPES[name].qtype


def _add_metadata(writer: gguf.GGUFWriter, output: QuantizedOutput, file_type: str) -> None:
    """The hyperparameters llama.cpp reads, as convert_hf_to_gguf.py writes them."""
    config = output.config
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    writer.add_name(output.folder.name)
    writer.add_quantized_by("lrquant")  # how `--overwrite` knows the file as lrquant's
    writer.add_description(
        f"{output.scheme.name} by {output.method or 'lrquant'}, from lrquant's integer codes"
    )
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(FILE_TYPES[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# the split regex of a byte-level BPE -> llama.cpp's name for that pre-tokenization
SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
}


def _pre_tokenizer(folder: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization: GPT-2's regex for a lone byte-level
    pre-tokenizer (SmolLM's when digits are split first), Qwen2's or Llama 3's for their split
    before a byte-level one. llama.cpp names the others by hashing tokenizations
    (convert_hf_to_gguf.py), so they are refused rather than guessed."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise LrquantError(
            f"'{folder}' has no tokenizer.json (a SentencePiece tokenizer?), and GGUF export writes "
            "byte-level BPE tokenizers only yet: export it with --format compressed-tensors instead"
        )
    pre = json.loads(file.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if kinds[-1:] == ["ByteLevel"] and not parts[-1].get("add_prefix_space"):
        regex = parts[-1].get("use_regex", True)  # GPT-2's
        if kinds == ["ByteLevel"] and regex:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and regex:
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not regex:
            name = SPLIT_REGEXES.get(parts[0].get("pattern", {}).get("Regex"))
            if name is not None:
                return name
    raise LrquantError(
        f"GGUF export does not know llama.cpp's name for the pre-tokenizer of '{folder}' yet (it writes "
        "GPT-2, SmolLM, Qwen2 and Llama 3 byte-level BPE): export it with --format compressed-tensors instead"
    )


def _add_tokenizer(writer: gguf.GGUFWriter, output: QuantizedOutput, pre: str) -> None:
    """A GPT-2 style BPE vocabulary, as convert_hf_to_gguf.py's ``_set_vocab_gpt2`` writes it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output.folder)
    vocab_size = output.config["vocab_size"]
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding has rows past the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        tokens.append(token)
        if token not in added:
            types.append(gguf.TokenType.NORMAL)
        elif tokenizer.added_tokens_decoder[i].special:
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(output.folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def write_gguf(output: QuantizedOutput, path: Path, gguf_type: str | TypeRules | None = None) -> None:
    """Write ``output`` as one GGUF file at ``path``.

    The quantized linears take the type their grid maps to (copied code for code when a legacy
    type holds it, :data:`EXACT_TYPES`; else fitted, :data:`FITTED_TYPES`) unless ``gguf_type``
    (``--gguf-type``, :func:`parse_type_rules`) says otherwise, per tensor if need be. The
    tensors are planned from their shapes, then read, packed and written one at a time: memory
    holds one tensor, whatever the model's size. What the model, scheme and types make
    impossible is refused (an :class:`LrquantError`) before the file is opened; a value that
    fp16 cannot hold is found while writing. The caller makes the write atomic.
    """
    if output.model_type in VISION_LANGUAGE_TYPES:
        output = language_model_of(output)
        log(
            "GGUF holds the language model; llama.cpp reads the vision tower and projector from a "
            "separate mmproj file, which this writer does not make"
        )
    if gguf_type is None:  # the types the grids were learned for, if any
        gguf_type = output.scheme.gguf_type
    rules = gguf_type if isinstance(gguf_type, TypeRules) else parse_type_rules(gguf_type)
    _refuse_config(output.config)
    refuse_scheme(output.scheme)
    pre = _pre_tokenizer(output.folder)
    arch, permute = ARCHITECTURES[output.model_type]
    tensors, types, fitted_types = _gguf_tensors(output, arch, permute, rules)
    file_type = Counter(types).most_common(1)[0][0]  # what most quantized linears are

    writer = gguf.GGUFWriter(Path(path), gguf.MODEL_ARCH_NAMES[arch])  # opens the file only to write
    _add_metadata(writer, output, file_type)
    _add_tokenizer(writer, output, pre)
    for tensor in tensors:
        tensor.add_info(writer)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in tensors:
            writer.write_tensor_data(tensor.make())
    finally:
        writer.close()
    if fitted_types:
        log(
            f"GGUF {', '.join(sorted(fitted_types))} cannot hold the {output.scheme.name} grid code for "
            "code: fitted to the learned weights, inside their clipping range"
        )
