"""``python -m asff_jax.benchmark --quick`` runs and reports self-consistent numbers."""

from __future__ import annotations

import json

import pytest

from asff_jax import benchmark


def test_input_benchmark_quick(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert benchmark.main(["--what", "input", "--quick", "--out", str(out)]) == 0
  res = json.loads(out.read_text())
  assert res["what"] == "input" and res["quick"] and len(res["results"]) == 2
  assert {r["mixup"] for r in res["results"]} == {True, False}
  for r in res["results"]:
    assert r["images"] == 3 * 8 and r["size"] == 128 and r["threads"] == 1
    assert r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0
    assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"])
    assert r["ratio_to_official_per_core"] == pytest.approx(
        r["images_per_cpu_s"] / benchmark.OFFICIAL_AUG_IMAGES_PER_CORE)
  printed = capsys.readouterr().out
  assert "x official/core" in printed and "128" in printed
