"""``python -m asff_jax.benchmark --quick`` runs every part and reports self-consistent numbers."""

from __future__ import annotations

import json

import pytest

from asff_jax.tools import benchmark


def test_benchmark_quick_all(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert benchmark.main(["--what", "all", "--quick", "--out", str(out)]) == 0
  res = json.loads(out.read_text())

  inp = res["input"]
  assert inp["what"] == "input" and inp["quick"] and len(inp["results"]) == 2
  assert {r["mixup"] for r in inp["results"]} == {True, False}
  for r in inp["results"]:
    assert r["images"] == 3 * 8 and r["size"] == 128 and r["threads"] == 1
    assert r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0
    assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"])
    assert r["ratio_to_official_per_core"] == pytest.approx(
        r["images_per_cpu_s"] / benchmark.OFFICIAL_AUG_IMAGES_PER_CORE)

  mod = res["models"]
  peak = mod["matmul_peak"]
  assert peak["gflops"] == pytest.approx(2 * peak["n"] ** 3 / peak["seconds"] / 1e9)
  rows = {(r["what"], r["model"]): r for r in mod["results"]}
  assert set(rows) == {(w, m) for w in ("forward", "train") for m in ("none", "asff")}
  for r in rows.values():
    assert r["size"] == 64 and r["batch"] == 1 and r["dtype"] == "float32"
    assert r["flops"] > 0 and r["seconds"] > 0 and r["compile_s"] > 0 and r["peak_bytes"] > 0
    assert r["gflops"] == pytest.approx(r["flops"] / r["seconds"] / 1e9)
    assert r["ratio_to_peak"] == pytest.approx(r["gflops"] / peak["gflops"])
  # a training step does more work than a forward; ASFF more than the baseline
  for m in ("none", "asff"):
    assert rows[("train", m)]["flops"] > 2 * rows[("forward", m)]["flops"]
  for w in ("forward", "train"):
    assert rows[(w, "asff")]["flops"] > rows[(w, "none")]["flops"]
    assert 0.5 < rows[(w, "asff")]["time_ratio_to_baseline"] < 5.0  # interleaved timing
  dcn = rows[("forward", "asff")]
  assert 0 < dcn["dcn_flops"] < dcn["flops"]
  assert dcn["dcn_share"] == pytest.approx(dcn["dcn_seconds"] / dcn["seconds"])
  printed = capsys.readouterr().out
  assert "x official/core" in printed and "matmul peak" in printed and "DCN" in printed


def test_unknown_model_is_refused():
  with pytest.raises(ValueError, match="--models"):
    benchmark.model_config("yolox")


@pytest.mark.slow
def test_benchmark_profile_quick(tmp_path):
  """``--what profile --quick``: the op-level breakdown covers the step (slow: two more compiles)."""
  out = tmp_path / "prof.json"
  assert benchmark.main(["--what", "profile", "--quick", "--out", str(out)]) == 0
  res = json.loads(out.read_text())["profile"]
  assert [r["what"] for r in res["results"]] == ["forward", "train"]
  for r in res["results"]:
    prof = r["profile"]
    assert prof["total_s"] > 0 and prof["wall_s"] > 0
    assert sum(v["share"] for v in prof["by_region"].values()) == pytest.approx(1.0)
    regions = {k.split("/")[0] for k in prof["by_region"]}
    assert {"backbone", "neck", "dcn"} <= regions
  train = res["results"][1]["profile"]
  assert any(k.startswith("conv-weight-grad/") for k in train["by_kind"])


def test_accelerator_check_quick(tmp_path):
  """``--what accelerator --quick``: the GPU/TPU check at a tiny size on whatever device JAX sees."""
  out = tmp_path / "acc.json"
  assert benchmark.main(["--what", "accelerator", "--quick", "--out", str(out)]) == 0
  r = json.loads(out.read_text())["accelerator"]
  peak = r["bf16_matmul_peak"]
  assert peak["gflops"] == pytest.approx(2 * peak["n"] ** 3 / peak["seconds"] / 1e9)
  (t,) = r["train"]
  assert t["dtype"] == "bfloat16" and t["batch"] == 1 and t["images_per_s"] == pytest.approx(1 / t["seconds"])
  assert t["ratio_to_bf16_peak"] == pytest.approx(t["gflops"] / peak["gflops"]) and t["peak_bytes"] > 0
  assert [f["size"] for f in r["forward"]] == [64] and r["forward"][0]["images_per_s"] > 0
  assert r["input"]["host_cores_needed"] == pytest.approx(t["images_per_s"] / r["input"]["images_per_cpu_s"])
  assert not r["skipped"]


def test_mobilenet_models_are_benchmarked():
  """``--models mobile_none,mobile_asff``: the MobileNetV2 models' rows (no DCN share: no deformable conv)."""
  rows = [benchmark.bench_case("forward", name, 64, 1, "float32", repeats=1, quick=True)
          for name in ("mobile_none", "mobile_asff")]
  for r in rows:
    assert r["seconds"] > 0 and r["flops"] > 0 and "dcn_share" not in r
  fwd = {r["model"]: r for r in rows}
  assert fwd["mobile_asff"]["flops"] > fwd["mobile_none"]["flops"]  # ASFFmobile's extra convs
  config = benchmark.model_config("mobile_asff", quick=True)
  assert config.model.backbone == "mobilenet_v2" and config.model.anchors == "yolov3"


def test_official_figures_are_the_side_by_side_ones():
  """``OFFICIAL_SECONDS`` are the best official times of ``../shared/docs/official_timing.md``."""
  import re
  from pathlib import Path
  doc = Path(__file__).resolve().parents[1].parent / "shared" / "docs" / "official_timing.md"
  if not doc.exists():
    pytest.skip(f"{doc} not found (expected ../shared beside the repo)")
  text = doc.read_text()
  rows, own = {}, {}
  for line in text.splitlines():
    m = re.match(r"\|\s*(eval forward, batch 1, (\d+)|training step.*batch (\d+) .*?, (\d+))\s*\|"
                 r"\s*([\d.]+) s\s*\|\s*\**([\d.]+) s\**\s*\|", line)
    if m:
      official = min(float(m.group(5)), float(m.group(6)))
      ours = float(re.search(r"\|\s*\**([\d.]+) s\**\s*\|\s*\**[\d.]+\**\s*\|\s*[\d.]+\s*\|\s*$",
                               line).group(1))
      key = ("forward", int(m.group(2)), 1) if m.group(2) else ("train", int(m.group(4)), int(m.group(3)))
      rows[key] = official
      own[key] = ours
  assert rows == benchmark.OFFICIAL_SECONDS
  assert own == benchmark.ASFF_JAX_SECONDS_IN_OFFICIAL_RUN
  peak = re.search(r"\*\*jax (\d+)\*\*", text)
  assert peak and float(peak.group(1)) == benchmark.OFFICIAL_RUN_JAX_PEAK_GFLOPS


@pytest.mark.slow  # two compilations of the step, ~40-70 s on 2 cores: on demand, like the benchmark itself
def test_train_ab_quick(tmp_path):
  """``--what train_ab --quick``: both kernel-gradient modes compiled and timed, the same loss after one step."""
  out = tmp_path / "ab.json"
  assert benchmark.main(["--what", "train_ab", "--quick", "--out", str(out)]) == 0
  res = json.loads(out.read_text())["train_ab"]
  (row,) = res["results"]
  assert row["modes"] == ["xla", "taps"] and res["matmul_peak"]["gflops"] > 0
  for m in row["modes"]:
    assert row[m]["seconds"] > 0 and row[m]["images_per_s"] == pytest.approx(row["batch"] / row[m]["seconds"])
  assert row["ratio"] == pytest.approx(row["taps"]["images_per_s"] / row["xla"]["images_per_s"])
  assert row["xla"]["loss"] == pytest.approx(row["taps"]["loss"], rel=1e-5)
