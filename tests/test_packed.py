"""Packed linears compute on real low-bit CPU kernels what the simulated (fake-quantized) ones do.

Tolerances: an int4 linear computing in float32 agrees with the dequantized weight to float
rounding (1e-5 of the largest output); in bfloat16 (what :func:`pack_linears` uses) to 2e-2 (the
input, steps and zero points are rounded to 8 significant bits). The int8 linear quantizes its
input as lrquant's activation quantizer does, so it agrees with the simulated ``QuantLinear`` to
float rounding too.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lrquant import api
from lrquant.config import QuantSpec, build_scheme
from lrquant.errors import LrquantError
from lrquant.export import read_output
from lrquant.models.loading import load_model
from lrquant.quant.linear import QuantLinear
from lrquant.quant.packed import Int4WeightLinear, Int8Linear, pack_linears, round_to_nearest

FLOAT32_TOL = 1e-5
BFLOAT16_TOL = 2e-2
BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def weight_spec(bits: int, symmetric: bool, group: int | None) -> QuantSpec:
    granularity = "channel" if group is None else "group"
    return QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, FLOAT32_TOL), (torch.bfloat16, BFLOAT16_TOL)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize(
    "shape, bits, group",
    [
        ((64, 128), 4, None),  # per channel: one kernel group size repeated along the row
        ((64, 128), 4, 32),
        ((48, 512), 4, 128),
        ((48, 512), 4, 256),
        ((48, 512), 4, 512),  # a multiple of a kernel group size
        ((40, 100), 4, 32),  # N not a multiple of 16, K not of the group: padded
        ((40, 100), 4, None),
        ((64, 192), 3, 96),  # 3-bit codes on the 4-bit kernel
        ((32, 64), 2, 64),
    ],
)
def test_int4_linear_matches_the_dequantized_weight(shape, bits, group, symmetric, dtype, tol) -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(shape), torch.randn(shape[0])
    integers = round_to_nearest(weight, weight_spec(bits, symmetric, group), bias)
    x = torch.randn(2, 5, shape[1])
    ref = F.linear(x, integers.dequantized(), bias)
    y = Int4WeightLinear(integers, dtype)(x.to(dtype))
    assert y.shape == ref.shape and y.dtype == dtype
    assert relative_error(y, ref) < tol


@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("a_symmetric", [False, True], ids=["a-asym", "a-sym"])
@pytest.mark.parametrize("w_symmetric", [False, True], ids=["w-asym", "w-sym"])
@pytest.mark.parametrize("bits", [8, 4])
def test_int8_linear_matches_the_simulated_quant_linear(bits, w_symmetric, a_symmetric, clip) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(100, 48)
    wspec = weight_spec(bits, w_symmetric, None)
    act = QuantSpec(bits=8, symmetric=a_symmetric, granularity="token", clip_ratio=clip)
    integers = round_to_nearest(linear.weight.detach(), wspec, linear.bias)
    simulated = QuantLinear(linear, wspec, act)
    simulated.freeze_weight()
    x = torch.randn(3, 7, 100) * 3 + 1  # off-centre tokens: the asymmetric zero point matters
    with torch.no_grad():
        ref = simulated(x)
        y = Int8Linear(integers, act)(x)
    assert relative_error(y, ref) < FLOAT32_TOL


@pytest.fixture(scope="module")
def data(text_file: Path) -> api.DataSettings:
    return api.DataSettings(calib=str(text_file), seqlen=32, nsamples=4)


def quantized_folder(tiny_llama: Path, data: api.DataSettings, folder: Path, scheme) -> Path:
    api.quantize(str(tiny_llama), folder, scheme, "rtn", "fast", {"compile": False}, data, run_eval=False)
    return folder


@pytest.mark.parametrize(
    "scheme, dtype, tol",
    [
        (build_scheme(4, group_size=32), torch.float32, 3e-2),
        (build_scheme(4, group_size=32), torch.bfloat16, 3e-2),
        (build_scheme(4, w_symmetric=True, head=True), torch.float32, 3e-2),
        (build_scheme(8, 8, w_symmetric=True, a_symmetric=True), torch.float32, 1e-2),
        (build_scheme(8, 8), torch.float32, 1e-2),
    ],
    ids=["w4g32", "w4g32-bf16", "w4-sym-head", "w8a8-sym", "w8a8-asym"],
)
def test_packed_tiny_llama_gives_the_simulated_logits(
    scheme, dtype, tol, tiny_llama: Path, data: api.DataSettings, tmp_path: Path
) -> None:
    """Logits of the whole model within ``tol`` of the largest simulated logit (float32). W4: the
    int4 products run in bfloat16 (in a float32 model too), and a bfloat16 model rounds the rest
    as well. W8A8: each linear agrees to 1e-6,
    but a difference that small can still move an input across a rounding boundary of its grid
    in a later layer, one step of 1/255 of that token's range (seen: up to 3e-3)."""
    folder = quantized_folder(tiny_llama, data, tmp_path / "out", scheme)
    output = read_output(folder)
    simulated = load_model(folder).model
    packed = copy.deepcopy(simulated).to(dtype)
    assert pack_linears(packed, output, "packed") == len(output.linears)
    assert not any(isinstance(m, QuantLinear) for m in packed.modules())
    tokens = torch.randint(3, 500, (2, 24))
    with torch.no_grad():
        ref = simulated(tokens).logits
        logits = packed(tokens).logits
    assert relative_error(logits, ref) < tol


def test_a_plain_transformers_model_takes_its_input_quantizers_from_the_scheme(
    tiny_llama: Path, data: api.DataSettings, tmp_path: Path
) -> None:
    """Without lrquant's quantizers attached (Q, K and V kept in full precision so that the
    simulated model has none either), the packed linears quantize their inputs as the scheme says."""
    from transformers import AutoModelForCausalLM

    post_act = QuantSpec(bits=8, symmetric=True, granularity="token")
    scheme = build_scheme(8, 8, qkv_bits=16, a_clip=0.9).model_copy(update={"post_act": post_act})
    output = read_output(quantized_folder(tiny_llama, data, tmp_path / "out", scheme))
    plain = AutoModelForCausalLM.from_pretrained(output.folder).eval()
    assert pack_linears(plain, output, "packed") == len(output.linears)
    assert plain.get_submodule("model.layers.0.mlp.down_proj").activation == post_act
    assert plain.get_submodule("model.layers.0.mlp.up_proj").activation == scheme.activation
    tokens = torch.randint(3, 500, (2, 24))
    with torch.no_grad():
        ref = load_model(output.folder).model(tokens).logits
        logits = plain(tokens).logits
    assert relative_error(logits, ref) < 1e-2


def test_schemes_without_a_kernel_are_refused_and_the_model_kept(
    tiny_llama: Path, data: api.DataSettings, tmp_path: Path
) -> None:
    output = read_output(quantized_folder(tiny_llama, data, tmp_path / "w4a4", build_scheme(4, 4)))
    model = load_model(output.folder).model
    before = [type(m) for m in model.modules()]
    with pytest.raises(LrquantError, match=r"W4A4 has no packed CPU kernel .*--backend fake"):
        pack_linears(model, output, "packed")
    assert [type(m) for m in model.modules()] == before
    assert pack_linears(model, output, "fake") == 0
    with pytest.raises(LrquantError, match="unknown backend 'cuda'"):
        pack_linears(model, output, "cuda")


@pytest.mark.parametrize(
    "bits, group, activation, message",
    [
        (4, 16, 16, "group size 16: the CPU int4 kernel takes groups of 32, 64, 128 or 256"),
        (8, None, 16, "8-bit weights with 16-bit activations have no packed CPU kernel"),
        (8, 32, 8, "weight groups of 32: the int8 kernel takes one step per output channel"),
        (4, None, 4, "the int8 kernel takes 8-bit activations only"),
    ],
)
def test_linears_without_a_kernel_are_refused(bits, group, activation, message) -> None:
    integers = round_to_nearest(torch.randn(32, 64), weight_spec(bits, True, group))
    act = QuantSpec(bits=activation, granularity="token")
    with pytest.raises(LrquantError, match=message):
        if activation < 16:
            Int8Linear(integers, act)
        else:
            Int4WeightLinear(integers)


def test_speed_benchmark_smoke_run(tmp_path: Path) -> None:
    env = {**os.environ, "LRQUANT_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(BENCHMARKS / "packed_speed.py"), "--smoke"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "W4A16" in out.stdout and "W8A8" in out.stdout
    assert (tmp_path / "packed_speed_smoke.json").is_file()
