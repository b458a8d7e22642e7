"""Smoke runs of the benchmark scripts on tiny random models (their real runs are not in CI).

Each script runs as a user runs it, in a fresh process, with its result files redirected to a
temporary folder (``LRQUANT_BENCH_RESULTS``), at the smallest budget that still learns.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lrquant.models.tiny_vision import save_tiny_vision_model

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
TINY_BUDGET = ["compile=false", "epochs=1"]  # compiling costs more than tiny models ever win back


def run_script(script: str, args: list[str], results: Path) -> str:
    env = {**os.environ, "LRQUANT_BENCH_RESULTS": str(results), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(BENCHMARKS / script), *args]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def rows(results: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (results / f"{name}.jsonl").read_text().splitlines()]


def test_llm_table_runs_records_and_resumes(tiny_llama, tmp_path) -> None:
    sets = [arg for item in ["nsamples=2", *TINY_BUDGET] for arg in ("--set", item)]
    command = ["--model", str(tiny_llama), "--methods", "rtn", "lrquant_plus", "--settings", "W4A4", "FP"]
    command += ["--preset", "fast", "--seqlen", "32", "--windows", "2", "--name", "smoke", *sets]
    run_script("llm_ppl.py", command, tmp_path)
    found = {(r["method"], r["setting"]): r for r in rows(tmp_path, "smoke")}
    assert set(found) == {("rtn", "W4A4"), ("lrquant_plus", "W4A4"), ("-", "FP")}
    assert all(math.isfinite(r["perplexity"]) and r["eval_tokens"] == 64 for r in found.values())
    assert found["lrquant_plus", "W4A4"]["matmuls"] in ("bf16", "fp32")
    assert found["rtn", "W4A4"]["matmuls"] is None  # nothing learned
    assert found["rtn", "W4A4"]["perplexity"] != found["-", "FP"]["perplexity"]  # the weights did change
    assert "kl" not in found["-", "FP"]
    for key in (("rtn", "W4A4"), ("lrquant_plus", "W4A4")):  # scored against full precision too
        assert found[key]["kl"] > 0 and 0 <= found[key]["top1_agreement"] < 1
    table = (tmp_path / "smoke.md").read_text()
    assert "| W4A4 |" in table and "lrquant_plus" in table

    # The same command again runs nothing: every row is already there.
    again = run_script("llm_ppl.py", command, tmp_path)
    assert len(rows(tmp_path, "smoke")) == 3
    assert "lrquant_plus W4A4" in " ".join(again.split())


def test_llm_table_with_a_second_text_resumes_too(tiny_llama, tmp_path) -> None:
    command = ["--model", str(tiny_llama), "--methods", "rtn", "--settings", "W4A8", "--seqlen", "32",
               "--windows", "2", "--eval-also", "news:test", "--name", "also"]  # fmt: skip
    run_script("llm_ppl.py", command, tmp_path)
    assert set(rows(tmp_path, "also")[0]["also"]) == {"news:test"}
    run_script("llm_ppl.py", command, tmp_path)  # finds its row: runs nothing
    assert len(rows(tmp_path, "also")) == 1


def test_vision_benchmarks_run_on_a_tiny_backbone(tmp_path) -> None:
    model = str(save_tiny_vision_model("dinov2", tmp_path / "dinov2"))
    results = tmp_path / "results"
    sets = [arg for item in TINY_BUDGET for arg in ("--set", item)]
    run_script(
        "vit_probe.py",
        ["--model", model, "--methods", "rtn", "lrquant_plus", "--settings", "W4A4", "--eval",
         "photos:heldout,digits@32", "--name", "vsmoke", *sets],
        results,
    )  # fmt: skip
    found = {r["method"]: r for r in rows(results, "vsmoke")}
    assert set(found) == {"fp", "rtn", "lrquant_plus"}
    assert found["fp"]["images"]["photos:heldout"]["cosine"] == 1.0
    for method in ("rtn", "lrquant_plus"):
        scores = found[method]["images"]
        assert 0 < scores["photos:heldout"]["cosine"] < 1
        assert 0 <= scores["digits@32"]["probe_accuracy"] <= 100
    assert found["lrquant_plus"]["matmuls"] in ("bf16", "fp32")
    assert found["lrquant_plus"]["calibration_images"] == 32

    # nsamples picks the number of calibration crops (it was once overridden silently)
    run_script(
        "vit_probe.py",
        ["--model", model, "--methods", "lrquant_plus", "--settings", "W4A4", "--eval",
         "photos:heldout,digits@32", "--name", "vsmoke", "--set", "nsamples=4", *sets],
        results,
    )  # fmt: skip
    fewer = [r for r in rows(results, "vsmoke") if "nsamples=4" in r["overrides"]]
    assert [r["calibration_images"] for r in fewer] == [4]
    assert fewer[0]["images"] != found["lrquant_plus"]["images"]
    assert found["rtn"]["cpu"]

    # --means runs nothing and averages each method over the seeds asked for (one here)
    means = run_script(
        "vit_probe.py",
        ["--model", model, "--eval", "photos:heldout,digits@32", "--name", "vsmoke", "--means", "0"],
        results,
    ).splitlines()  # fmt: skip
    assert len(rows(results, "vsmoke")) == 4
    rtn_line = next(line for line in means if line.startswith("| rtn | W4A4 |"))
    cosine = found["rtn"]["images"]["photos:heldout"]["cosine"]
    assert f"| 0 | {cosine:.4f} |" in rtn_line

    run_script(
        "vit_overfit.py",
        ["--model", model, "--setting", "W4A4", "--jobs", "rtn", "lrquant_plus," + ",".join(TINY_BUDGET),
         "--name", "osmoke"],
        results,
    )  # fmt: skip
    (rtn, plus) = rows(results, "osmoke")
    assert (rtn["method"], plus["method"]) == ("rtn", "lrquant_plus")
    for row in (rtn, plus):
        assert set(row["cosine"]) == {"calibration crops", "fresh crops, same photos", "held-out photos"}
        assert all(0 < c["feature"] < 1 for c in row["cosine"].values())
    assert "held-out photos" in (results / "osmoke.md").read_text()


def test_step_time_runs_on_a_tiny_llm(tiny_llama, tmp_path) -> None:
    args = ["--model", str(tiny_llama), "--seqlen", "32", "--steps", "2", "--warmup", "1", "--profile"]
    out = run_script("step_time.py", args, tmp_path)
    assert "steps under torch.profiler" in out and "aten::mm" in out
    table = [line for line in out.splitlines() if line.startswith("| bf16") or line.startswith("| fp32")]
    assert len(table) == 4  # bf16/fp32 x eager/compiled
    for line in table:
        per_step = float(line.split("|")[3])
        assert per_step > 0


def test_quantizer_speed_times_eager_and_compiled(tmp_path) -> None:
    args = ["--rows", "32", "--columns", "64", "--group-size", "16", "--repeats", "1"]
    out = run_script("quantizer_speed.py", args, tmp_path)
    table = [line.split("|") for line in out.splitlines() if line.startswith(("| eager", "| compiled"))]
    assert len(table) == 3  # eager, compiled, compiled with autograd's range
    assert all(float(cells[2]) > 0 and float(cells[3]) > 0 for cells in table)
    assert "storing a boolean each" in out


def test_clip_search_cost_runs_on_a_tiny_llm(tiny_llama, tmp_path) -> None:
    args = ["--model", str(tiny_llama), "--wbits", "2", "--group-size", "16", "--seqlen", "32"]
    out = run_script("clip_search_cost.py", [*args, "--nsamples", "2", "--set", "compile=false"], tmp_path)
    cells = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    table = {row[0].strip(): row[1:] for row in cells}
    minmax, search = table["minmax"], table["search"]
    assert int(minmax[2]) == 0 and int(search[2]) == 2  # the searched start searches in both blocks
    assert all(0 < float(c) <= 1 for c in minmax[3:] + search[3:])


def test_e2e_sweep_matches_a_full_run(tiny_llama, tmp_path) -> None:
    # The sweep shares one block-wise pass between its variants; each variant must still give what
    # a full llm_ppl.py run of the same settings gives.
    base = ["--model", str(tiny_llama), "--preset", "fast", "--seqlen", "32", "--windows", "2"]
    sets = [arg for item in ["nsamples=2", "bf16=false", *TINY_BUDGET] for arg in ("--set", item)]
    sweep = ["--setting", "W4A16", "--name", "sweep", "--store", str(tmp_path / "store"), *base, *sets]
    # the second variant trains its end-to-end step on one window more than the block-wise pass
    more = "e2e_epochs=2,lr_e2e=3e-3,e2e_samples=3"
    variants = ["--variants", "e2e_epochs=1", more]
    run_script("e2e_sweep.py", [*sweep, *variants], tmp_path)
    found = {r["variant"]: r for r in rows(tmp_path, "sweep")}
    assert set(found) == {"e2e_epochs=1", more}
    assert len(found["e2e_epochs=1"]["e2e_kl"]) == 1 and len(found[more]["e2e_kl"]) == 2
    full = ["--methods", "lrquant_plus", "--settings", "W4A16", "--name", "full", *base, *sets]
    more_sets = ["--set", "e2e_epochs=2", "--set", "lr_e2e=3e-3", "--set", "e2e_samples=3"]
    run_script("llm_ppl.py", [*full, *more_sets], tmp_path)
    expected = rows(tmp_path, "full")[0]["perplexity"]
    assert found[more]["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert found["e2e_epochs=1"]["perplexity"] != found[more]["perplexity"]
    # the same command again finds both rows and runs nothing
    assert "already" in run_script("e2e_sweep.py", [*sweep, *variants], tmp_path)
    assert len(rows(tmp_path, "sweep")) == 2

    # A variant that would change the shared block-wise pass is refused with a message.
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "e2e_sweep.py"), *sweep, "--variants", "epochs=3"],
        env={**os.environ, "LRQUANT_BENCH_RESULTS": str(tmp_path)}, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode != 0 and "changes more than the end-to-end fields" in out.stderr


def test_setting_names_take_clipping_and_rotated_qkv_in_either_order(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from llm_ppl import SETTINGS, setting_kwargs
    from vit_probe import SETTINGS as VIT_SETTINGS

    assert setting_kwargs(SETTINGS, "W4A4") == {"wbits": 4, "abits": 4}
    both = {"wbits": 4, "abits": 4, "a_clip": 0.9, "rotate_qkv": True}
    assert setting_kwargs(SETTINGS, "W4A4-c0.9-rqkv") == setting_kwargs(SETTINGS, "W4A4-rqkv-c0.9") == both
    assert setting_kwargs(VIT_SETTINGS, "W4A4-qkv16-c0.9") == {
        "wbits": 4,
        "abits": 4,
        "qkv_bits": 16,
        "a_clip": 0.9,
    }
    for bad in ("W4A5", "W4A4-x", "W4A4-cfast"):
        with pytest.raises((KeyError, ValueError)):
            setting_kwargs(SETTINGS, bad)
    from vlm_table import claim_arg

    assert claim_arg("auto:omniquant") == "auto:omniquant"
    for bad in ("auto", "auto:", "a:b:c"):
        with pytest.raises(argparse.ArgumentTypeError):
            claim_arg(bad)


def test_stage_time_runs_on_a_tiny_llm(tiny_llama, tmp_path) -> None:
    args = [
        "--model",
        str(tiny_llama),
        "--seqlen",
        "32",
        "--blocks",
        "2",
        "--wbits",
        "3",
        "--set",
        "compile=false",
    ]
    out = run_script("stage_time.py", args, tmp_path)
    rows_ = {
        line.split("|")[1].strip(): [float(cell) for cell in line.split("|")[2:5]]
        for line in out.splitlines()
        if line.startswith("| ") and "---" not in line and "stage" not in line
    }
    assert rows_["train"][0] > 0 and rows_["search clipping"][0] > 0  # the weight-only rule searches clipping
    mean, first, later = rows_["the whole block"]
    assert mean >= rows_["train"][0]
    assert mean == pytest.approx((first + later) / 2, abs=0.02)  # two blocks: the first and one later


def test_vision_language_table_runs_on_a_tiny_llava(tmp_path) -> None:
    from lrquant.models.tiny_vlm import save_tiny_vlm

    model = str(save_tiny_vlm("llava", tmp_path / "llava"))
    results = tmp_path / "results"
    sets = [arg for item in TINY_BUDGET for arg in ("--set", item)]
    args = ["--model", model, "--methods", "rtn", "lrquant_plus", "--settings", "W4A4", "--tower", "both",
            "--nsamples", "4", "--eval-pairs", "8", "--name", "vlmsmoke", *sets]  # fmt: skip
    run_script("vlm_table.py", args, results)
    found = {(r["method"], r["tower"]): r for r in rows(results, "vlmsmoke")}
    assert set(found) == {("rtn", False), ("rtn", True), ("lrquant_plus", False), ("lrquant_plus", True)}
    for row in found.values():
        assert row["eval_pairs"] == 8 and 0 < row["fidelity"]["kl"] < 1
    assert "| lrquant_plus | W4A4 | yes |" in (results / "vlmsmoke.md").read_text()
    run_script("vlm_table.py", args, results)  # a rerun skips the finished rows
    assert len(rows(results, "vlmsmoke")) == 4
    run_script("vlm_table.py", [*args, "--projector", "--methods", "rtn", "--tower", "no"], results)
    assert [r["projector"] for r in rows(results, "vlmsmoke")] == [False] * 4 + [True]
    assert "| rtn | W4A4 | no | yes |" in (results / "vlmsmoke.md").read_text()


def test_vision_language_paired_orders_on_a_tiny_llava(tmp_path) -> None:
    from lrquant.models.tiny_vlm import save_tiny_vlm

    model = str(save_tiny_vlm("llava", tmp_path / "llava"))
    results = tmp_path / "results"
    sets = [arg for item in TINY_BUDGET for arg in ("--set", item)]
    args = ["--model", model, "--methods", "rtn", "lrquant_plus", "--settings", "W4A4", "--nsamples", "4",
            "--eval-pairs", "8", "--name", "paired", "--paired", "--orders", "lrquant_plus:rtn",
            *sets]  # fmt: skip
    run_script("vlm_table.py", args, results)
    found = {r["method"]: r for r in rows(results, "paired")}
    kl = {method: row["fidelity"]["kl"] for method, row in found.items()}
    for row in found.values():
        assert len(row["pairs"]["kl"]) == 8 and all(t > 0 for t in row["pairs"]["tokens"])
    # the pairs scored one at a time add up to the run's own evaluation of the same pairs
    plain = ["--model", model, "--methods", "rtn", "--settings", "W4A4", "--nsamples", "4",
             "--eval-pairs", "8", "--name", "plain", *sets]  # fmt: skip
    run_script("vlm_table.py", plain, results)
    (evaluated,) = rows(results, "plain")
    paired = found["rtn"]
    assert paired["fidelity"]["kl"] == pytest.approx(evaluated["fidelity"]["kl"], rel=1e-4)
    assert paired["fidelity"]["top1_agreement"] == pytest.approx(evaluated["fidelity"]["top1_agreement"])
    assert paired["perplexity"]["quantized"] == pytest.approx(evaluated["perplexity"]["quantized"], rel=1e-4)
    line = next(
        x for x in (results / "paired_orders.md").read_text().splitlines() if "| lrquant_plus | rtn |" in x
    )
    diff, low, high = (
        float(v) for v in line.split("|")[5].replace("[", " ").replace("]", " ").replace(",", " ").split()
    )
    assert diff == pytest.approx(kl["lrquant_plus"] - kl["rtn"], abs=1e-4) and low <= diff <= high


def test_stream_scale_runs_on_a_tiny_shape(tmp_path) -> None:
    args = ["--shape", "tiny", "--methods", "rtn", "gptq", "--nsamples", "1", "--seqlen", "32", "--eval"]
    run_script("stream_scale.py", [*args, "--group-size", "32", "--name", "rows"], tmp_path)
    rows_ = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [row["method"] for row in rows_] == ["rtn", "gptq"]
    assert all(row["peak_rss_mb"] > 0 and row["output_bytes"] > row["checkpoint_bytes"] for row in rows_)
    assert all(isinstance(row["peak_disk_bytes"], int) for row in rows_)
    assert rows_[1]["fidelity"]["kl"] > 0 and len(rows_[1]["learned_block_seconds"]) == 2
    assert 0 < rows_[1]["peak_anon_mb"] <= rows_[1]["peak_rss_mb"]
    assert rows_[1]["activations"]["where"] == "memory (cpu)" and rows_[1]["activations"]["bytes"] > 0
    assert rows_[1]["device"] == "cpu" and rows_[1]["peak_gpu_mb"] is None


def test_time_model_prints_estimates_beside_measured_rows(tmp_path) -> None:
    row = {"shape": "1b", "method": "gptq", "nsamples": 1, "seqlen": 32, "overrides": None,
           "scheme": {"wbits": 4, "abits": 16, "group_size": 128}, "perplexity": None,
           "seconds_per_block": 12.5, "peak_rss_mb": 3072}  # fmt: skip
    on_gpu = {**row, "device": "cuda", "seconds_per_block": 0.5}  # another device's row: not beside
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(on_gpu) + "\n")
    args = ["--shapes", "1b", "70b", "--methods", "rtn", "gptq", "--nsamples", "1", "--seqlen", "32"]
    out = run_script("time_model.py", [*args, "--measured", "rows"], tmp_path)
    table = [line for line in out.splitlines() if line.startswith("| 1b") or line.startswith("| 70b")]
    assert len(table) == 4
    gptq_1b = table[1].split("|")
    assert gptq_1b[3].strip() == "gptq" and gptq_1b[5].strip() == "12.5" and gptq_1b[8].strip() == "3.0"
    assert float(table[3].split("|")[4]) > float(gptq_1b[4])  # a 70B block costs more than a 1B one


def test_processes_compares_one_process_with_two(tiny_llama, tmp_path) -> None:
    args = ["--model", str(tiny_llama), "--processes", "2", "--threads", "2", "--group-size", "16",
            "--nsamples", "4", "--eval-windows", "2", "--set", "epochs=1", "--set", "compile=false",
            "--name", "procs"]  # fmt: skip
    run_script("processes.py", [*args, "--set", "bf16=false"], tmp_path)
    row = json.loads((tmp_path / "procs.jsonl").read_text())
    assert row["processes"] == 2 and len(row["wall_s"]) == 2 and row["codes_differ"] < 0.01
    assert row["perplexity"][1] == pytest.approx(row["perplexity"][0], rel=1e-3)


def test_stream_equal_compares_a_streamed_run_with_an_in_memory_one(tiny_llama, tmp_path) -> None:
    args = ["--model", str(tiny_llama), "--wbits", "3", "--group-size", "16", "--nsamples", "2",
            "--seqlen", "32", "--set", "epochs=1", "--set", "e2e_epochs=1", "--name", "eq"]  # fmt: skip
    run_script("stream_equal.py", args, tmp_path)
    row = json.loads((tmp_path / "eq.jsonl").read_text())
    assert row["streamed"] == [False, True] and row["tensors"] > 0
    assert row["tensors_differ"] == 0 and row["e2e_kl"][0] == row["e2e_kl"][1] and len(row["e2e_kl"][0]) == 1


def test_eval_dtype_scores_float32_beside_bf16(tiny_llama, tmp_path) -> None:
    from lrquant import api
    from lrquant.config import build_scheme

    out = tmp_path / "rtn"
    data = api.DataSettings(seqlen=32, nsamples=1)
    api.quantize(str(tiny_llama), out, build_scheme(wbits=4, group_size=16), "rtn", data=data, run_eval=False)
    args = ["--model", str(tiny_llama), "--quantized", str(out), "--seqlen", "32", "--windows", "2"]
    run_script("eval_dtype.py", [*args, "--name", "dtype"], tmp_path)
    row = rows(tmp_path, "dtype")[0]
    assert row["windows"] == 2 and row["fp32"]["perplexity"] > 1 and row["bf16"]["perplexity"] > 1
    assert 0 <= row["bf16_against_fp32"]["kl"] < 0.05 and row["bf16_against_fp32"]["top1_agreement"] > 0.5
    assert row["quantized_fp32"]["kl"] > 0 and row["quantized_bf16"]["kl"] > 0


def test_e2e_step_time_runs_on_a_tiny_llm(tiny_llama, tmp_path) -> None:
    args = ["--model", str(tiny_llama), "--seqlen", "32", "--steps", "2", "--warmup", "1", "--profile"]
    out = run_script("e2e_step_time.py", args, tmp_path)
    assert "steps under torch.profiler" in out and "aten::mm" in out
    row = next(line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit())
    per_step, share = (float(cell) for cell in row.strip("| \n").split("|"))
    # both printed rounded: the seconds to whole ones, the step to thousandths (times 64 steps)
    assert per_step > 0 and share == pytest.approx(per_step * 32 * 2, abs=0.5 + 0.0005 * 64)
