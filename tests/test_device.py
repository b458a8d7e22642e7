"""Learning and evaluating on a compute device: the model stays in host memory, each block visits the
device, and the result matches a CPU run. In CI the device is the CPU; ``LRQUANT_TEST_DEVICE=cuda``
runs the same tests on a GPU."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import TEST_DEVICE, logits, rel_err
from test_cli import error_line, run

from lrquant import api
from lrquant.arch import get_arch_spec
from lrquant.config import build_scheme
from lrquant.device import placed, resolve_device, to_device
from lrquant.errors import LrquantError
from lrquant.eval.images import model_outputs
from lrquant.eval.perplexity import perplexity
from lrquant.methods.blockwise import quantize_blockwise
from lrquant.models.tiny import tiny_model
from lrquant.models.tiny_vision import tiny_vision_model
from lrquant.recipes import build_recipe

DEVICE = resolve_device(TEST_DEVICE)
W4A4 = build_scheme(4, 4, group_size=16)
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where there is no GPU")


# ------------------------------------------------------------------------------------ choosing a device


def test_auto_picks_a_gpu_only_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(LrquantError, match="2 CUDA GPU"):
        resolve_device("cuda:2")
    with pytest.raises(LrquantError, match="does not exist"):
        resolve_device("cuda:x")


def test_a_missing_gpu_or_unknown_device_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LrquantError, match="sees no CUDA GPU.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(LrquantError, match="unknown device 'tpu'; use auto, cpu"):
        resolve_device("tpu")


@needs_no_gpu
def test_cli_asking_for_a_gpu_that_is_not_there_is_one_error_line(
    capsys: pytest.CaptureFixture[str], tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = ["--model", tiny_llama, "--device", "cuda"]
    line = error_line(*run(capsys, "quantize", *argv, "--output", out, "--method", "rtn"))
    assert "sees no CUDA GPU" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "sees no CUDA GPU" in error_line(*run(capsys, "eval", *argv))


def test_to_device_moves_tensors_inside_containers() -> None:
    value = {"a": torch.ones(2), "b": (torch.zeros(1), 3, [torch.ones(1)]), "c": None}
    moved = to_device(value, DEVICE)
    assert moved["a"].device.type == moved["b"][0].device.type == moved["b"][2][0].device.type == DEVICE.type
    assert isinstance(moved["b"], tuple) and moved["b"][1] == 3 and moved["c"] is None


def test_placed_returns_the_module_to_the_cpu_even_on_errors() -> None:
    layer = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="inside"):
        with placed(layer, DEVICE):
            assert layer.weight.device.type == DEVICE.type
            raise RuntimeError("inside")
    assert layer.weight.device.type == "cpu"


# ----------------------------------------------------------------- learning on the device = on the CPU


def _on_cpu(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


# the optional learners too: rounding offsets, an online Hadamard on the down projection's input,
# and clipping bounds that start at the searched shrink factor
OPTIONS = {"rounding": True, "hadamard": "down", "clip_init": "search", "lr_clipping": 0.1}


@pytest.mark.parametrize(
    "model_type, options",
    [("llama", {}), ("opt", {}), ("vit", {}), ("swin", {}), ("llama", OPTIONS)],
    ids=["llama", "opt", "vit", "swin", "llama-options"],
)
def test_blocks_learned_on_the_device_match_the_cpu(model_type: str, options: dict) -> None:
    """lrquant_plus W4A4 (fp32, no autocast) on the test device against the same run on the CPU.

    Without training (capture, statistics, smoothing init, folding, quantization) the models agree
    to float rounding. Training is chaotic at this size: on the CPU alone, scaling every weight by
    1 + 1e-6 noise moves the trained model's logits by 8-11 % (llama, opt), as much as W4A4
    quantization itself. So the trained models are compared by their error, not by their values:
    on the CPU bit for bit, on a GPU no worse than 1.25x the CPU's.
    The model is back in host memory after every run."""
    vision = model_type in ("vit", "swin")
    base = tiny_vision_model(model_type, num_layers=2) if vision else tiny_model(model_type, num_layers=2)
    arch = get_arch_spec(model_type)
    generator = torch.Generator().manual_seed(0)
    if vision:
        size = base.config.image_size
        calibration = torch.randn(4, 3, size, size, generator=generator)
        held_out = torch.randn(2, 3, size, size, generator=generator)

        def forward(model: nn.Module) -> torch.Tensor:
            with torch.no_grad():
                return model(pixel_values=held_out).last_hidden_state
    else:
        calibration = torch.randint(3, base.config.vocab_size, (4, 32), generator=generator)
        held_out = torch.randint(3, base.config.vocab_size, (2, 48), generator=generator)

        def forward(model: nn.Module) -> torch.Tensor:
            return logits(model, held_out)

    fp = forward(base)
    out: dict[tuple[int, str], torch.Tensor] = {}
    losses: dict[str, list] = {}
    for epochs in (0, 2):
        overrides = {"epochs": epochs, "nsamples": 4, "bf16": False, **options}
        recipe = build_recipe("lrquant_plus", "fast", overrides)
        for where in ("cpu", str(DEVICE)):
            model = copy.deepcopy(base)
            reports = quantize_blockwise(
                model, arch, W4A4, recipe, calibration, seed=0, device=torch.device(where)
            ).reports
            assert _on_cpu(model)
            assert all(len(r.losses) == epochs and r.retries == 0 for r in reports)
            out[epochs, where] = forward(model)
            losses[where] = [r.losses for r in reports]
    cpu, dev = "cpu", str(DEVICE)
    untrained_err, trained_err = rel_err(out[0, cpu], fp), rel_err(out[2, cpu], fp)
    assert untrained_err > 1e-2  # quantization did something
    print(
        f"{model_type}: untrained device vs CPU {rel_err(out[0, dev], out[0, cpu]):.2e}; error to FP: "
        f"untrained {untrained_err:.4f}, trained CPU {trained_err:.4f}, trained device "
        f"{rel_err(out[2, dev], fp):.4f}"
    )
    if DEVICE.type == "cpu":
        assert torch.equal(out[0, dev], out[0, cpu]) and torch.equal(out[2, dev], out[2, cpu])
        assert losses[dev] == losses[cpu]
        return
    assert rel_err(out[0, dev], out[0, cpu]) < 1e-3
    assert rel_err(out[2, dev], fp) < 1.25 * trained_err
    for dev_block, cpu_block in zip(losses[dev], losses[cpu], strict=True):
        assert dev_block[0] == pytest.approx(cpu_block[0], rel=0.05)  # the first epoch's mean loss


def test_autocast_learning_on_the_device_beats_rtn() -> None:
    """With bf16 autocast on (the GPU default), learning still beats round-to-nearest."""
    from lrquant.methods.rtn import quantize_rtn

    base = tiny_model("llama", seed=0, num_layers=2)
    arch = get_arch_spec("llama")
    with torch.no_grad():
        for block in arch.block_list(base):
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    module.weight.mul_(5)
        base.get_input_embeddings().weight[:, [3, 17, 30, 51]] *= 20
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randint(3, base.config.vocab_size, (8, 32), generator=generator)
    held_out = torch.randint(3, base.config.vocab_size, (4, 64), generator=generator)
    fp = logits(base, held_out)
    rtn = copy.deepcopy(base)
    quantize_rtn(rtn, arch, build_scheme(4, 4))
    learned = copy.deepcopy(base)
    recipe = build_recipe("lrquant_plus", "fast", {"epochs": 3, "bf16": True})
    quantize_blockwise(learned, arch, build_scheme(4, 4), recipe, calibration, seed=0, device=DEVICE)
    assert _on_cpu(learned)
    assert rel_err(logits(learned, held_out), fp) < 0.9 * rel_err(logits(rtn, held_out), fp)


# --------------------------------------------------------------------------- evaluation on the device


def test_perplexity_and_image_features_on_the_device_match_the_cpu() -> None:
    model = tiny_model("qwen2", num_layers=2)
    windows = torch.randint(3, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    on_cpu = perplexity(model, windows)
    with placed(model, DEVICE):
        on_device = perplexity(model, windows)
    assert math.isfinite(on_cpu) and on_device == pytest.approx(on_cpu, rel=1e-4)

    vit = tiny_vision_model("dinov2", num_layers=2)
    arch = get_arch_spec("dinov2")
    pixels = torch.randn(3, 3, vit.config.image_size, vit.config.image_size)
    ref = model_outputs(vit, arch, pixels, batch_size=2)
    with placed(vit, DEVICE):
        got = model_outputs(vit, arch, pixels, batch_size=2)
    assert got.device.type == "cpu" and rel_err(got, ref) < 1e-4
    assert _on_cpu(vit)


def test_quantize_on_the_device_reports_it(tiny_llama: Path, text_file: Path, tmp_path: Path) -> None:
    data = api.DataSettings(calib=str(text_file), eval=str(text_file), seqlen=32, nsamples=4, eval_windows=2)
    report = api.quantize(
        str(tiny_llama),
        tmp_path / "out",
        scheme=W4A4,
        method="lrquant_plus",
        preset="fast",
        overrides={"epochs": 1},
        data=data,
        device=TEST_DEVICE,
    )
    assert report["device"] == str(DEVICE)
    assert ("peak_gpu_mb" in report) == (DEVICE.type == "cuda")
    ppl = report["perplexity"]
    assert math.isfinite(ppl["quantized"]) and ppl["quantized"] > ppl["fp"]
    again = api.evaluate(str(tmp_path / "out"), data, device=TEST_DEVICE)
    assert again["device"] == str(DEVICE)
    assert again["perplexity"] == pytest.approx(ppl["quantized"], rel=1e-4)


def test_out_of_gpu_memory_is_one_error_line(
    capsys: pytest.CaptureFixture[str], tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(api, "quantize", out_of_memory)
    argv = ["quantize", "--model", tiny_llama, "--output", tmp_path / "out", "--device", "cpu"]
    line = error_line(*run(capsys, *argv))
    assert "out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in line
    assert "--device cpu" in line
