"""Converter: name mapping, errors, partial loading, .pth CLI round trip."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from asff_jax.tools.convert import (expected_layout, strip_state_dict, variables_from_official,
                              variables_to_official)
from asff_jax.models import create_model, default_model_config
from asff_jax.tools.parity import state_dict_from_spec
from tests.conftest import parity_file

REPO = Path(__file__).resolve().parents[1]


def small_config(fusion="asff", rfb=False):
  c = default_model_config()
  c.fusion, c.rfb, c.num_classes, c.width, c.stage_blocks = fusion, rfb, 3, 0.125, (1, 1, 1, 1, 1)
  return c


@pytest.fixture(scope="module")
def official_names():
  spec = json.loads(parity_file("state_dict_spec.json").read_text())
  return {e["name"]: tuple(e["shape"]) for e in spec["entries"]}


def test_layout_matches_official_names_and_shapes(official_names):
  layout = expected_layout(default_model_config())
  ours = {leaf.official: leaf.official_shape for leaf in layout}
  expected = {k: v for k, v in official_names.items() if not k.endswith("num_batches_tracked")}
  assert ours == expected


def test_baseline_numbering():
  cfg = default_model_config()
  cfg.fusion = "none"
  ours = {leaf.official: leaf.official_shape for leaf in expected_layout(cfg)}
  assert ours["module_list.18.conv.weight"] == (1024, 512, 3, 3)   # level-0 3x3 conv
  assert ours["module_list.19.guide_wh.weight"] == (8, 1024, 1, 1)  # head L0
  assert ours["module_list.20.conv.weight"] == (256, 512, 1, 1)    # = ASFF layer 18
  assert ours["module_list.27.conv.weight"] == (512, 256, 3, 3)    # level-1 3x3 conv
  assert ours["module_list.28.conv.weight"] == (340, 512, 1, 1)    # head L1
  assert ours["module_list.36.conv.weight"] == (256, 128, 3, 3)    # = ASFF layer 32
  assert ours["module_list.37.Feature_adaption.dconv.weight"] == (256, 256, 3, 3)
  assert ours["module_list.34.module_list.0.0.conv.weight"] == (128, 256, 1, 1)  # = ASFF 30 (DropBlock is 33)
  assert not any(k.startswith("level_") for k in ours)


@pytest.mark.parametrize("fusion,rfb", [("asff", False), ("none", False), ("asff", True),
                                        ("sum", False), ("concat", False)])
def test_round_trip(fusion, rfb):
  cfg = small_config(fusion, rfb)
  model = create_model(cfg)
  v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  sd = variables_to_official(v, cfg)
  back = variables_from_official(sd, cfg)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), v, back)


def test_errors_name_key_and_shapes():
  cfg = small_config()
  model = create_model(cfg)
  v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  sd = variables_to_official(v, cfg)

  missing = dict(sd)
  del missing["level_1_header.guide_wh.bias"]
  with pytest.raises(ValueError, match=r"missing: level_1_header\.guide_wh\.bias"):
    variables_from_official(missing, cfg)

  extra = dict(sd, **{"level_3_fusion.expand.conv.weight": np.zeros((1,))})
  with pytest.raises(ValueError, match=r"unexpected: level_3_fusion\.expand\.conv\.weight"):
    variables_from_official(extra, cfg)

  bad = dict(sd)
  bad["module_list.0.conv.weight"] = np.zeros((8, 3, 5, 5), np.float32)
  with pytest.raises(ValueError, match=r"module_list\.0\.conv\.weight: expected \(8, 3, 3, 3\), got \(8, 3, 5, 5\)"):
    variables_from_official(bad, cfg)


def test_asff_star_weights_into_asff_config_fail_clearly():
  sd = state_dict_from_spec(parity_file("state_dict_spec_rfb.json"))
  with pytest.raises(ValueError) as e:
    variables_from_official(sd, default_model_config())
  msg = str(e.value)
  assert "level_0_fusion.weight_level_0.conv.weight: expected (16, 512, 1, 1), got (8, 512, 1, 1)" in msg
  assert "unexpected: level_0_header.Feature_adaption.rfb.branch_0.0.weight" in msg


def test_partial_backbone_checkpoint():
  cfg = small_config()
  model = create_model(cfg)
  v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  sd = variables_to_official(v, cfg)
  backbone = {k: v_ + 1.0 for k, v_ in sd.items()
              if k.startswith("module_list.") and int(k.split(".")[1]) <= 10}
  base = jax.jit(model.init)(jax.random.key(7), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match="missing"):
    variables_from_official(backbone, cfg)
  out, report = variables_from_official(backbone, cfg, strict=False, base_variables=base,
                                        return_report=True)
  assert sorted(report.loaded) == sorted(backbone)
  assert len(report.missing) == len(sd) - len(backbone) and not report.unexpected
  np.testing.assert_array_equal(out["params"]["backbone"]["layer_0"]["conv"]["kernel"],
                                np.asarray(v["params"]["backbone"]["layer_0"]["conv"]["kernel"]) + 1.0)
  np.testing.assert_array_equal(out["params"]["head_0"]["conv"]["kernel"],
                                np.asarray(base["params"]["head_0"]["conv"]["kernel"]))
  assert "loaded" in str(report)


def test_strip_wrappers_and_torch_tensors():
  cfg = small_config()
  model = create_model(cfg)
  v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  sd = variables_to_official(v, cfg)
  assert all(a.flags.writeable for a in sd.values())  # torch.from_numpy needs writable arrays
  wrapped = {"model": {"module." + k: torch.from_numpy(a) for k, a in sd.items()},
             "optimizer": {}}
  assert set(strip_state_dict(wrapped)) == set(sd)
  sd_t = {k: torch.from_numpy(a) for k, a in sd.items()}
  sd_t["module_list.0.batch_norm.num_batches_tracked"] = torch.tensor(5)
  out = variables_from_official({"state_dict": sd_t}, cfg)
  np.testing.assert_array_equal(out["params"]["head_2"]["conv"]["bias"], sd["level_2_header.conv.bias"])


def test_cli_reads_pth_and_writes_orbax(tmp_path, capsys):
  cfg_file = tmp_path / "tiny.py"
  cfg_file.write_text(textwrap.dedent("""
      from asff_jax.models import default_model_config
      import ml_collections
      def get_config():
        c = ml_collections.ConfigDict()
        c.model = default_model_config()
        c.model.num_classes, c.model.width, c.model.stage_blocks = 3, 0.125, (1, 1, 1, 1, 1)
        return c
  """))
  cfg = small_config()
  model = create_model(cfg)
  v = jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 64, 64, 3)))
  sd = variables_to_official(v, cfg)
  pth = tmp_path / "w.pth"
  torch.save({"model": {"module." + k: torch.from_numpy(a) for k, a in sd.items()}}, pth)
  out_dir = tmp_path / "out"
  res = subprocess.run([sys.executable, "-m", "asff_jax.convert", f"--pth={pth}", f"--config={cfg_file}",
                        f"--out={out_dir}"], capture_output=True, text=True, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  assert json.loads((out_dir / "config.json").read_text())["model"]["width"] == 0.125
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(out_dir / "checkpoints" / "0" / "state")  # plain orbax
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), v, restored)
  from asff_jax.config import load_workdir_config
  from asff_jax.training.checkpoints import load_variables
  loaded, step = load_variables(str(out_dir))
  assert step == 0 and load_workdir_config(str(out_dir)).model.num_classes == 3
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), v, loaded)

  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"not a checkpoint")
  # a user's bad file: one line, status 2 (in-process through the entry point the subprocess above ran)
  from asff_jax import convert  # pylint: disable=import-outside-toplevel  (CLI module, this test only)
  capsys.readouterr()
  assert convert.main([f"--pth={bad}", f"--config={cfg_file}", f"--out={out_dir}2"]) == 2
  err = capsys.readouterr().err
  assert "bad.pth: cannot read" in err and "Traceback" not in err

def test_evaluate_pth_one_liner_matches_evaluating_the_variables(tmp_path, capsys):
  """``evaluate --pth F.pth --config FILE``: the metrics of the converted weights, and the per-class table."""
  from asff_jax import evaluate  # pylint: disable=import-outside-toplevel  (CLI module, this test only)
  from asff_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel  (this test only)
  from asff_jax.models import random_variables  # pylint: disable=import-outside-toplevel  (this test only)
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel  (this test only)

  config = tiny_config()
  variables = random_variables(create_model(config), seed=4)
  torch.save({k: torch.from_numpy(v) for k, v in variables_to_official(variables, config).items()},
             tmp_path / "w.pth")
  out = tmp_path / "eval_w"
  code = evaluate.main([f"--pth={tmp_path / 'w.pth'}", f"--config={REPO / 'configs' / 'tiny.py'}",
                        f"--out_dir={out}"])
  printed = capsys.readouterr().out
  assert code == 0
  got = json.loads((out / f"{config.dataset.eval_split}_metrics.json").read_text())
  want = evaluator.evaluate_variables(config, variables, max_images=0, show_progress=False, per_class=True)
  for k in ("AP", "AP50", "AP75", "AP_agnostic"):
    assert got[k] == pytest.approx(want[k], abs=1e-6), k
  assert [r["category_id"] for r in got["per_class"]] == [r["category_id"] for r in want["per_class"]]
  assert "class_0" in printed and "#GT" in printed and "AP50" in printed


# ----------------------------------------------------------------------------- MobileNetV2 models


def _mobile(fusion):
  c = default_model_config()
  c.backbone, c.fusion, c.anchors = "mobilenet_v2", fusion, "yolov3"
  return c


@pytest.mark.parametrize("fusion,spec,count", [("asff", "state_dict_spec_mobile_asff.json", 27_141_613),
                                               ("none", "state_dict_spec_mobile_baseline.json", 24_800_532)])
def test_mobilenet_layout_counts_and_round_trip(fusion, spec, count):
  """Names and shapes are the official state dict's, entry for entry; parameters as the fixture README."""
  cfg = _mobile(fusion)
  entries = json.loads(parity_file(spec).read_text())["entries"]
  official = {e["name"]: tuple(e["shape"]) for e in entries if not e["name"].endswith("num_batches_tracked")}
  layout = expected_layout(cfg)
  assert {leaf.official: leaf.official_shape for leaf in layout} == official
  assert sum(int(np.prod(leaf.shape)) for leaf in layout if leaf.collection == "params") == count
  sd = state_dict_from_spec(parity_file(spec))
  v = variables_from_official(sd, cfg)
  back = variables_to_official(v, cfg)
  assert set(back) == set(official)
  for k, arr in back.items():
    np.testing.assert_array_equal(arr, sd[k], err_msg=k)
  # a depthwise conv: (C, 1, 3, 3) official, (3, 3, 1, C) Flax (feature_group_count = C)
  assert v["params"]["backbone"]["layer_3"]["dw"]["conv"]["kernel"].shape == (3, 3, 1, 144)


def test_mobilenet_strict_errors_and_non_strict_backbone():
  cfg = _mobile("asff")
  sd = state_dict_from_spec(parity_file("state_dict_spec_mobile_asff.json"))
  # a MobileNet state dict into the Darknet model, and a Darknet one into the MobileNet model, fail clearly
  with pytest.raises(ValueError, match=r"(?s)backbone='darknet53'.*unexpected 426.*unexpected: level_0_conv\.expand"):
    variables_from_official(sd, default_model_config())
  with pytest.raises(ValueError, match=r"(?s)backbone='mobilenet_v2'.*missing 426.*missing: module_list\.0\.0\.weight"):
    variables_from_official(state_dict_from_spec(parity_file("state_dict_spec.json")), cfg)
  bad = dict(sd, **{"module_list.3.conv.1.0.weight": np.zeros((144, 3, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"module_list\.3\.conv\.1\.0\.weight: expected \(144, 1, 3, 3\), "
                                        r"got \(144, 3, 3, 3\)"):
    variables_from_official(bad, cfg)
  # the MobileNetV2 features alone (module_list.0-18), non-strict: loaded, the rest reported missing
  backbone = {k: v for k, v in sd.items() if k.startswith("module_list.") and int(k.split(".")[1]) <= 18}
  out, report = variables_from_official(backbone, cfg, strict=False, return_report=True,
                                        base_variables=jax.tree.map(np.zeros_like, variables_from_official(sd, cfg)))
  assert not report.unexpected and not report.mismatched
  assert sorted(report.loaded) == sorted(k for k in backbone if not k.endswith("num_batches_tracked"))
  assert report.missing and all(not n.startswith("module_list.") or int(n.split(".")[1]) >= 19
                                for n in report.missing)
  np.testing.assert_array_equal(out["params"]["backbone"]["layer_18"]["conv"]["kernel"],
                                np.asarray(sd["module_list.18.0.weight"]).transpose(2, 3, 1, 0))
  assert not np.any(out["params"]["neck"]["layer_11"]["block_0_conv_0"]["conv"]["kernel"])
