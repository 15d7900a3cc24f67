"""``config.init``: start from an official backbone file, from COCO weights with another class count,
from a workdir; freezing is bit-exact (asff_jax.training.warm_start)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asff_jax import config as config_lib
from asff_jax.errors import ConfigError, MissingFileError
from asff_jax.models import create_model
from asff_jax.tools.convert import variables_from_official
from asff_jax.tools.parity import state_dict_from_spec
from asff_jax.training import checkpoints, warm_start
from tests.conftest import parity_file, tiny_config

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def official_sd():
  """The complete official ASFF state dict (80 classes, full width) of the parity fixture."""
  return state_dict_from_spec(parity_file("state_dict_spec.json"))


def _full_config(num_classes=80):
  c = config_lib.default_config()
  c.model.num_classes = num_classes
  return c


def _fresh(config):
  model = create_model(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
  rng = np.random.default_rng(1)  # distinct from any source value, cheaper than a full-width init
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def _save(sd, path):
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)
  return str(path)


def test_official_backbone_file_into_a_fresh_detector(official_sd, tmp_path):
  backbone = {k: v for k, v in official_sd.items() if k.split(".")[1].isdigit()
              and int(k.split(".")[1]) <= 10 and k.startswith("module_list.")}
  assert {k.split(".")[1] for k in backbone} == {str(i) for i in range(11)}
  path = _save(backbone, tmp_path / "darknet53_feature_mx.pth")
  config = _full_config()
  config.init.checkpoint = path
  fresh = _fresh(config)
  variables, report = warm_start.warm_start(fresh, config)
  want = warm_start.flatten(variables_from_official(official_sd, config))
  got, before = warm_start.flatten(variables), warm_start.flatten(fresh)
  loaded = set(report.loaded)
  assert loaded and all(p.startswith("backbone/") for p in loaded)
  for key, v in got.items():
    path_ = warm_start.leaf_path(key)
    if path_.startswith("backbone/"):
      assert path_ in loaded
      np.testing.assert_array_equal(v, want[key])
    else:
      np.testing.assert_array_equal(v, before[key])  # left fresh
  # every backbone tensor of the file was used (num_batches_tracked are not variables)
  n_file = sum(1 for k in backbone if not k.endswith("num_batches_tracked"))
  assert len(loaded) == n_file and not report.unused and not report.shape
  assert report.fresh == len(got) - n_file == len(report.missing)
  text = str(report)
  assert f"loaded {n_file} tensors" in text and "missing in the source: neck/" in text


def test_coco_weights_into_another_class_count(official_sd, tmp_path):
  path = _save(official_sd, tmp_path / "YOLOv3-ASFF.pth")
  config = _full_config(num_classes=5)
  config.init.checkpoint = path
  fresh = _fresh(config)
  variables, report = warm_start.warm_start(fresh, config)
  src = warm_start.flatten(variables_from_official(official_sd, _full_config(80)))
  got, before = warm_start.flatten(variables), warm_start.flatten(fresh)
  partial = {p for p, a, b in report.partial}
  assert partial == {f"head_{l}/conv/{leaf}" for l in range(3) for leaf in ("kernel", "bias")}
  assert all(a == 80 and b == 5 for _, a, b in report.partial)
  assert not report.missing and not report.shape and not report.excluded
  for key, v in got.items():
    p = warm_start.leaf_path(key)
    if p in partial:
      lead = v.shape[:-1]
      new, old, s = (x.reshape(*lead, 4, -1) for x in (v, before[key], src[key]))
      np.testing.assert_array_equal(new[..., :5], s[..., :5])  # x, y, w, h, obj of each slot
      np.testing.assert_array_equal(new[..., 5:], old[..., 5:])  # class channels fresh
    else:
      np.testing.assert_array_equal(v, src[key])
  assert "partly: head_0/conv/kernel (source 80 classes, model 5" in str(report)


def test_include_exclude_and_errors(official_sd, tmp_path):
  path = _save(official_sd, tmp_path / "w.pth")
  config = _full_config()
  config.init.checkpoint = path
  config.init.include = r"^(backbone|neck)/"
  config.init.exclude = r"^neck/"
  fresh = _fresh(config)
  _, report = warm_start.warm_start(fresh, config)
  assert report.loaded and all(p.startswith("backbone/") for p in report.loaded)
  assert report.excluded and not any(p.startswith("backbone/") for p in report.excluded)
  config.init.exclude = "("
  with pytest.raises(ConfigError, match=r"init.exclude='\(' is not a valid regular expression"):
    warm_start.warm_start(fresh, config)
  config.init.checkpoint = str(tmp_path / "nope.pth")
  with pytest.raises(MissingFileError, match="nope.pth: no such file"):
    warm_start.load_source(config.init.checkpoint, config)
  with pytest.raises(ConfigError, match="matches no parameter"):
    warm_start.frozen_mask(fresh["params"], "^no_such_module/")


def _tiny_run_config(tmp_path, name, steps, **init):
  c = tiny_config()
  c.dataset.source = "synthetic"
  c.dataset.synthetic_num_train = 8
  c.num_train_steps = steps
  c.batch_size = 2
  c.eval_every_steps = 0
  c.eval_at_end = False
  c.write_tensorboard = False
  c.optimizer.ema_decay = 0.9
  for k, v in init.items():
    c.init[k] = v
  return c, str(tmp_path / name)


def test_init_from_workdir_and_freeze_is_bit_exact(tmp_path, caplog):
  from asff_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel

  config_a, dir_a = _tiny_run_config(tmp_path, "a", 2)
  # a workdir as `convert` writes it (the same reader as a training workdir's; distinct values)
  source = jax.device_get(jax.jit(create_model(config_a).init, static_argnames="train")(
      jax.random.key(7), jnp.zeros((1, 64, 64, 3), jnp.float32), train=False))  # not the run's seed-0 init
  checkpoints.write_workdir(dir_a, source, config_a)
  freeze = r"^(backbone|neck)/"
  config_b, dir_b = _tiny_run_config(tmp_path, "b", 3, checkpoint=dir_a, freeze=freeze)
  with caplog.at_level(logging.INFO, logger="asff_jax"):
    state_b = train_and_evaluate(config_b, dir_b, show_progress=False)
  assert any("init from " in r.getMessage() and "loaded" in r.getMessage() for r in caplog.records)
  src = warm_start.flatten(source)
  got = warm_start.flatten({"params": jax.device_get(state_b.params),
                            "batch_stats": jax.device_get(state_b.batch_stats)})
  ema = warm_start.flatten({"params": jax.device_get(state_b.ema_params)})
  frozen = changed = 0
  for key, v in got.items():
    p = warm_start.leaf_path(key)
    if key[0] == "params" and p.startswith(("backbone/", "neck/")):
      np.testing.assert_array_equal(v, src[key], err_msg=p)  # frozen: bit-identical
      np.testing.assert_array_equal(ema[key], src[key], err_msg=p)
      frozen += 1
    elif key[0] == "batch_stats" and p.startswith(("backbone/", "neck/")):
      np.testing.assert_array_equal(v, src[key], err_msg=p)  # BN in eval mode: stats unchanged
    elif key[0] == "batch_stats" or p.endswith("kernel"):
      changed += int(not np.array_equal(v, src[key]))
  assert frozen > 50 and changed > 10  # the rest trained (stats and kernels moved)

  # a resumed run ignores init.checkpoint
  config_c, _ = _tiny_run_config(tmp_path, "b", 3, checkpoint=str(tmp_path / "gone"), freeze=freeze)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="asff_jax"):
    train_and_evaluate(config_c, dir_b, show_progress=False)
  assert any("ignored: the resumed state" in r.getMessage() for r in caplog.records)
