"""Streamed models (``--stream``): the blocks are loaded one at a time from the safetensors files.

A streamed run must write what an in-memory run writes, bit for bit, evaluate to the same
numbers, resume after an interruption, refuse what it cannot do in one line, and hold memory
flat in the model's depth.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lrquant.checkpoint
from lrquant import api, cli
from lrquant.config import build_scheme
from lrquant.errors import LrquantError
from lrquant.methods.resume import ResumeStore
from lrquant.models import streaming
from lrquant.models.loading import load_model
from lrquant.models.tiny import save_tiny_model
from lrquant.models.tiny_vision import save_tiny_vision_model

SCHEME_WA = build_scheme(4, 4, group_size=16)
SCHEME_W = build_scheme(3, 16, group_size=16)
FAST = {"epochs": 1}


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("stream") / "llama", num_layers=3)


@pytest.fixture(scope="module")
def data(text_file: Path) -> api.DataSettings:
    return api.DataSettings(calib=str(text_file), eval=str(text_file), seqlen=32, nsamples=4, eval_windows=3)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder, by file kind (the model's shards count as one, and so do
    the integer codes') and name."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        kind = next((k for k in ("model", "integer_weights") if file.name.startswith(k)), file.name)
        out.update({f"{kind}:{key}": t for key, t in load_file(file).items()})
    return out


def _quantize(model: Path, out: Path, data, method: str, scheme, overrides, stream: bool, **kwargs) -> dict:
    return api.quantize(
        str(model), out, scheme, method, "fast", overrides, data, stream=stream, device="cpu", **kwargs
    )


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, method: str, at: int) -> None:
    """Make the resume store's ``method`` (save_block, save_folded) stop the run right after it
    wrote block ``at``."""
    original = getattr(ResumeStore, method)

    def then_interrupt(self, index, *args, **kwargs) -> None:
        original(self, index, *args, **kwargs)
        if index == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumeStore, method, then_interrupt)


@pytest.mark.parametrize(
    ("model_type", "method", "scheme", "overrides"),
    [
        ("llama", "rtn", SCHEME_W, None),
        ("llama-bf16", "lrquant_plus", SCHEME_WA, FAST),
        ("qwen3-bf16", "gptq", SCHEME_W, {"hadamard": "folded"}),
        ("llama", "lrquant_plus", SCHEME_W, {**FAST, "gptq": True}),
        ("qwen2", "lrquant_plus", SCHEME_WA, {**FAST, "hadamard": "down"}),
        ("llama", "smoothquant", SCHEME_WA, {"hadamard": "online"}),
        ("mistral", "rtn", SCHEME_WA, {"hadamard": "inputs"}),
        ("gemma3_text", "omniquant", SCHEME_WA, FAST),
        ("llama-bf16", "lrquant_plus", SCHEME_W, {**FAST, "e2e_epochs": 1, "rounding": True}),
        ("qwen2", "auto", SCHEME_WA, FAST),  # the W4A4 default: a run-time rotation, the end-to-end step
    ],
)
def test_streamed_run_writes_and_scores_what_an_in_memory_run_does(
    model_type, method, scheme, overrides, data, tiny_models, tmp_path: Path
) -> None:
    source = save_tiny_model(model_type.removesuffix("-bf16"), tmp_path / "model", num_layers=3)
    if model_type.endswith("-bf16"):  # as most checkpoints are: an untied head and a 16-bit embedding
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(source).to(torch.bfloat16).save_pretrained(source)
    reports = {}
    for stream in (False, True):
        reports[stream] = _quantize(
            source, tmp_path / f"out-{stream}", data, method, scheme, overrides, stream
        )
    memory, streamed = _tensors(tmp_path / "out-False"), _tensors(tmp_path / "out-True")
    assert set(memory) == set(streamed)
    assert any(key.startswith("integer_weights:") for key in memory)
    for key, tensor in memory.items():
        assert torch.equal(tensor, streamed[key]), key
    assert reports[True]["model"]["streamed"] and not reports[False]["model"]["streamed"]
    # 3 blocks and the rest; a head left on disk until the save in a shard of its own
    index = json.loads((tmp_path / "out-True" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(list((tmp_path / "out-True").glob("model-*-of-*.safetensors"))) == len(shards) in (4, 5)
    assert len(shards) == 4 or {k for k, v in index["weight_map"].items() if v == shards[-1]} == {
        "lm_head.weight"
    }
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for k, t in streamed.items() if k.startswith("model:")
    )
    # the same evaluation, computed block by block with the full-precision model beside
    for key in ("perplexity", "fidelity"):
        assert reports[True][key] == pytest.approx(reports[False][key], rel=1e-9), key
    # a plain transformers load of the sharded output gives the in-memory output's logits
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(tmp_path / f"out-{s}").eval()(input_ids=ids).logits
            for s in (False, True)
        ]
    assert torch.equal(logits[0], logits[1])


def test_streamed_eval_equals_in_memory_eval(llama3: Path, data, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _quantize(llama3, out, data, "rtn", SCHEME_WA, None, stream=False, run_eval=False)
    memory = api.evaluate(str(out), data, reference=str(llama3))
    streamed = api.evaluate(str(out), data, reference=str(llama3), stream=True)
    for key in ("perplexity", "kl", "top1_agreement", "windows"):
        assert streamed[key] == pytest.approx(memory[key], rel=1e-9), key
    plain = api.evaluate(str(llama3), data, stream=True)  # no reference: perplexity alone
    assert "kl" not in plain and plain["perplexity"] > 1


def test_interrupted_streamed_run_resumes_to_the_uninterrupted_result(
    llama3: Path, data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = tmp_path / "whole"
    _quantize(llama3, whole, data, "lrquant_plus", SCHEME_WA, FAST, stream=True, run_eval=False)
    loaded_blocks: list[int] = []
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, "save_block", 1)
    with pytest.raises(KeyboardInterrupt):
        _quantize(llama3, out, data, "lrquant_plus", SCHEME_WA, FAST, stream=True, run_eval=False)
    assert not out.exists()
    monkeypatch.undo()
    load = streaming.Stream.load

    def counted(self, index, files=None):
        loaded_blocks.append(index)
        return load(self, index, files)

    monkeypatch.setattr(streaming.Stream, "load", counted)
    _quantize(llama3, out, data, "lrquant_plus", SCHEME_WA, FAST, stream=True, run_eval=False)
    assert loaded_blocks[0] == 2  # the two finished blocks were not learned again
    first, second = _tensors(whole), _tensors(out)
    assert set(first) == set(second)
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_streamed_end_to_end_step_interrupted_while_folding_resumes_to_the_same_output(
    llama3: Path, data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end-to-end step folds into files beside the block-wise result: cut short, a rerun
    trains it again from that result and ends where an uninterrupted run ends."""
    settings = {**FAST, "e2e_epochs": 1}
    whole = tmp_path / "whole"
    report = _quantize(llama3, whole, data, "lrquant_plus", SCHEME_W, settings, stream=True, run_eval=False)
    assert len(report["blocks"][-1]["e2e_kl"]) == 1
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, "save_folded", 1)
    with pytest.raises(KeyboardInterrupt):
        _quantize(llama3, out, data, "lrquant_plus", SCHEME_W, settings, stream=True, run_eval=False)
    assert {p.name for p in (tmp_path / ".out.resume" / "e2e").iterdir()} >= {"block-1.safetensors"}
    monkeypatch.undo()
    again = _quantize(llama3, out, data, "lrquant_plus", SCHEME_W, settings, stream=True, run_eval=False)
    assert again["blocks"][-1]["e2e_kl"] == report["blocks"][-1]["e2e_kl"]
    first, second = _tensors(whole), _tensors(out)
    assert set(first) == set(second)
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_a_store_block_of_another_model_is_refused_at_the_save(
    llama3: Path, data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed resume does not read its finished blocks back; the save, which links them
    into the output, refuses one whose tensors are not the model's, and writes nothing."""
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, "save_block", 1)
    with pytest.raises(KeyboardInterrupt):
        _quantize(llama3, out, data, "lrquant_plus", SCHEME_W, FAST, stream=True, run_eval=False)
    monkeypatch.undo()
    block = tmp_path / ".out.resume" / "block-0.safetensors"
    moved = {key.replace("layers.0.", "layers.1."): t for key, t in load_file(block).items()}
    save_file(moved, block, {"format": "pt"})
    with pytest.raises(LrquantError, match="block 1 in .* does not fit the model: delete that folder"):
        _quantize(llama3, out, data, "lrquant_plus", SCHEME_W, FAST, stream=True, run_eval=False)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_streamed_model_holds_no_block_weights_until_loaded(llama3: Path) -> None:
    loaded = load_model(str(llama3), stream=True)
    stream = loaded.stream
    assert all(p.is_meta for block in stream.skeletons for p in block.parameters())
    assert stream.lazy == ["lm_head.weight"] and loaded.model.lm_head.weight.is_meta  # untied: on disk
    stream.load_lazy()
    assert not any(p.is_meta for name, p in loaded.model.named_parameters() if ".layers." not in name)
    block = stream.load(1)
    reference = load_model(str(llama3)).model.model.layers[1]
    assert all(
        torch.equal(a, b)
        for a, b in zip(block.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    stream.release(1)
    assert loaded.model.model.layers[1] is stream.skeletons[1]


def test_what_a_streamed_run_cannot_do_is_refused_in_one_line(llama3: Path, data, tmp_path: Path) -> None:
    tiny_vit = save_tiny_vision_model("vit", tmp_path / "vit")
    out = tmp_path / "out"
    more = {**FAST, "e2e_epochs": 1, "e2e_samples": 8}  # beyond the 4 block-wise windows
    with pytest.raises(
        LrquantError, match="e2e_samples=8 runs the full-precision model whole .* e2e_samples=0"
    ):
        _quantize(llama3, out, data, "lrquant_plus", SCHEME_W, more, stream=True)
    with pytest.raises(LrquantError, match="--stream covers language models"):
        api.quantize(str(tiny_vit), out, SCHEME_WA, "rtn", stream=True)
    assert not out.exists()
    with pytest.raises(LrquantError, match="fake backend only"):
        api.evaluate(str(llama3), data, stream=True, backend="packed")


def test_stream_is_chosen_when_the_model_would_not_fit(
    llama3: Path, data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = _quantize(llama3, tmp_path / "a", data, "rtn", SCHEME_W, None, stream=None, run_eval=False)
    assert report["model"]["streamed"] is False
    size = streaming.float32_bytes(llama3)
    assert size == pytest.approx(
        4 * sum(p.numel() for p in load_model(str(llama3)).model.state_dict().values()), rel=0.01
    )
    monkeypatch.setattr(streaming, "available_memory", lambda: size)  # 100 % needed: more than 60 %
    report = _quantize(llama3, tmp_path / "b", data, "rtn", SCHEME_W, None, stream=None, run_eval=False)
    assert report["model"]["streamed"] is True
    code = cli.main(["quantize", "--model", str(llama3), "--output", str(tmp_path / "c"), "--method", "rtn",
                     "--stream", "on", "--no-eval", "--wbits", "4"])  # fmt: skip
    assert code == 0 and json.loads((tmp_path / "c" / "report.json").read_text())["model"]["streamed"]


@pytest.mark.parametrize("links", [True, False])
def test_streamed_output_links_the_finished_blocks_of_the_store(
    links: bool, llama3: Path, data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The save names the store's block files in the output (hard links: the blocks take their
    disk space once) and copies them where the file system cannot link; the same output."""
    linked = []
    real_link = lrquant.checkpoint.os.link

    def link(source, target) -> None:
        if not links:
            raise OSError(18, "Invalid cross-device link")
        real_link(source, target)
        assert Path(source).samefile(target)
        linked.append((Path(source).name, Path(target).name))

    monkeypatch.setattr(lrquant.checkpoint.os, "link", link)
    out = tmp_path / "out"
    _quantize(llama3, out, data, "lrquant_plus", SCHEME_W, FAST, stream=True, run_eval=False)
    count = len(list(out.glob("model-*.safetensors")))  # 3 blocks, the rest (and a head on its own)
    if links:  # every block's weights and integer codes, nothing else
        assert sorted(linked) == sorted(
            [(f"block-{i}.safetensors", f"model-{i + 1:05d}-of-{count:05d}.safetensors") for i in range(3)]
            + [
                (f"integers-{i}.safetensors", f"integer_weights-{i + 1:05d}-of-{count:05d}.safetensors")
                for i in range(3)
            ]
        )
    quant = json.loads((out / "lrquant_quant.json").read_text())
    assert quant["integer_weights"] == [
        f"integer_weights-{i:05d}-of-{count:05d}.safetensors" for i in range(1, 4)
    ]
    monkeypatch.undo()
    memory = tmp_path / "memory"
    _quantize(llama3, memory, data, "lrquant_plus", SCHEME_W, FAST, stream=False, run_eval=False)
    expected, got = _tensors(memory), _tensors(out)
    assert set(expected) == set(got)
    assert all(torch.equal(t, got[k]) for k, t in expected.items())
    assert not (tmp_path / ".out.resume").exists()  # cleared once the output is written


MEMORY_SCRIPT = """
import json, sys, torch
from lrquant import api
from lrquant.config import build_scheme
torch.set_num_threads(1)
report = api.quantize(sys.argv[1], sys.argv[2], build_scheme(4, 16, group_size=64), "rtn",
                      run_eval=False, stream=sys.argv[3] == "on")
print(json.dumps(report["peak_rss_mb"]))
"""
EXPORT_SCRIPT = """
import json, resource, sys, torch
import lrquant.export.compressed_tensors as ct
from lrquant import api
torch.set_num_threads(1)
ct.SHARD_BYTES = 8 * 2**20  # shards of 8 MiB, as a large model's of 2 GiB
api.export(sys.argv[1], sys.argv[3], sys.argv[2])
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""


def test_streamed_memory_is_flat_in_depth(tmp_path: Path) -> None:
    """Peak resident memory of a streamed run (in a fresh process) grows by less than four blocks
    (13 MiB each in float32) from 4 to 32 blocks of a bfloat16 checkpoint, while an in-memory
    run's grows by at least 28; so do the exports' of the streamed output."""
    import transformers

    def model(depth: int) -> Path:
        path = save_tiny_model("llama", tmp_path / f"d{depth}", num_layers=depth)
        config = json.loads((path / "config.json").read_text())
        config.update(hidden_size=512, intermediate_size=1536, head_dim=128, num_attention_heads=4,
                      num_key_value_heads=4)  # fmt: skip
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**config)).save_pretrained(
            path
        )
        return path

    def peak(path: Path, stream: str) -> float:
        out = tmp_path / f"out-{path.name}-{stream}"
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(path), str(out), stream],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return float(done.stdout.strip().splitlines()[-1])

    block_mb = (4 * 512 * 512 + 3 * 512 * 1536) * 4 / 2**20
    shallow, deep = model(4), model(32)
    peaks = {
        (depth, stream): peak(path, stream)
        for depth, path in ((4, shallow), (32, deep))
        for stream in ("on", "off")
    }
    streamed = peaks[32, "on"] - peaks[4, "on"]
    in_memory = peaks[32, "off"] - peaks[4, "off"]
    assert in_memory > 28 * block_mb, in_memory  # the check can tell the two apart
    assert streamed < 4 * block_mb, (streamed, in_memory)  # measured 4-10 MiB; allocator noise

    # the exports of the streamed outputs read, pack and write one tensor (or shard) at a time
    def export_peak(depth: int, fmt: str) -> float:
        out, packed = tmp_path / f"out-d{depth}-on", tmp_path / f"d{depth}-{fmt}"
        done = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(out), str(packed), fmt],
                              capture_output=True, text=True, check=True)  # fmt: skip
        size = sum(p.stat().st_size for p in ([packed] if packed.is_file() else packed.rglob("*")))
        assert size > depth * block_mb * 2**20 * 4 / 32  # at least 4 bits a weight, all blocks
        return float(done.stdout.strip().splitlines()[-1])

    for fmt in ("gguf", "compressed-tensors"):
        exported = export_peak(32, fmt) - export_peak(4, fmt)
        assert exported < 4 * block_mb, (fmt, exported)


def test_a_streamed_output_exports_as_an_in_memory_one(llama3: Path, data, tmp_path: Path) -> None:
    """The packed export reads the streamed output's shards: the same compressed-tensors files."""
    for stream in (False, True):
        _quantize(llama3, tmp_path / f"o{stream}", data, "gptq", SCHEME_W, None, stream, run_eval=False,
                  format="compressed-tensors")  # fmt: skip
    memory, streamed = (_tensors(tmp_path / f"o{s}-compressed-tensors") for s in (False, True))
    assert set(memory) == set(streamed) and all(torch.equal(memory[k], streamed[k]) for k in memory)
