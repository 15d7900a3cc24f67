"""Tests of ``asff_jax.models.targets`` and ``asff_jax.models.losses`` (spec §4, §6).

Parity part: the official PyTorch loss recorded in ``../shared/parity``
(``asff_official_loss.npz`` and ``asff_official_loss_heads.npz``, see the
"Training-loss fixture" section of its README). The head outputs are fed
straight into our loss (NCHW -> NHWC), so no network is involved. Checked:

* every component per level and the total for the main, ``ls_off/`` and
  ``mixup/`` cases (rtol 1e-4, the README's float32 suggestion);
* d total / d raw and d total / d guide_wh against the stored gradients;
* the assignment table, best priors, overwritten flags, assignment IoUs and
  the per-level ignore masks (exactly);
* ``detach_anchor_targets=True`` removes exactly ±tgt_scale/B at the
  responsible slots' w/h ``guide_wh`` channels (README quirk 1), nothing else;
* the adjacent-ignore option changes ``obj`` only;
* jit with ``jax.transfer_guard('disallow')``.

Synthetic part (small grids, no fixture): last-writer-wins, multi-hot classes,
slot-3 shape target from the later GT, padding rule, images without GTs, the
adjacent-ignore geometry and input validation.

The fixtures are 20-26 MB; each is loaded once per module. Skipped with a
message if ``../shared/parity`` is absent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asff_jax.config import default_loss_config
from asff_jax.models import losses
from asff_jax.models import targets
# parity_file: ../shared/parity (Path(__file__).resolve().parents[1].parent / 'shared' /
# 'parity'); skips with a clear message when the file is absent.
from tests.conftest import parity_file

INPUT_HW = (416, 416)
C = 80


@pytest.fixture(scope="module")
def fx():
  """``asff_official_loss.npz`` loaded once into a dict of numpy arrays."""
  with np.load(parity_file("asff_official_loss.npz")) as z:
    keep = [k for k in z.files if not k.startswith(("grad/", "ls_off/grad", "mixup/grad",
                                                     "f64/grad")) and k != "input"]
    out = {k: z[k] for k in keep}
  # The official 6-column form with mixup off (weight 1): same compiled loss as `mixup`.
  lab = out["labels"]
  out["labels6"] = np.concatenate([lab, np.ones_like(lab[..., :1])], -1)
  return out


@pytest.fixture(scope="module")
def heads():
  """``asff_official_loss_heads.npz``: NHWC head outputs (device) and grads (numpy)."""
  with np.load(parity_file("asff_official_loss_heads.npz")) as z:
    nhwc = lambda k: np.ascontiguousarray(z[k].transpose(0, 2, 3, 1))
    levels = [dict(raw=nhwc(f"head_raw_l{l}"), guide_wh=nhwc(f"head_guide_wh_l{l}"))
              for l in range(3)]
    grads = [dict(raw=nhwc(f"grad/head_raw_l{l}"), guide_wh=nhwc(f"grad/head_guide_wh_l{l}"))
             for l in range(3)]
  return dict(levels=jax.device_put(levels), grads=grads)


@functools.lru_cache(maxsize=None)
def _components_and_targets(label_smoothing=True, adjacent_ignore_eps=None):
  """Jitted: per-level components ``(3,)`` and the 3 LevelTargets (one compile per config)."""
  def run(levels, labels):
    outs = [losses.level_loss(lv["raw"], lv["guide_wh"], labels, level=l, num_classes=C,
                              input_hw=INPUT_HW, label_smoothing=label_smoothing,
                              adjacent_ignore_eps=adjacent_ignore_eps, return_targets=True)
            for l, lv in enumerate(levels)]
    aux = {k: jnp.stack([o[0][k] for o in outs]) for k in losses.COMPONENTS}
    return aux, [o[1] for o in outs]
  return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _head_loss_ls_off():
  """Jitted ``head_loss`` with label smoothing off, configured by the ``loss`` config
  section; shared by two tests (one compile)."""
  cfg = default_loss_config()
  cfg.label_smoothing = False
  return jax.jit(functools.partial(losses.head_loss, loss_config=cfg, num_classes=C,
                                   input_hw=INPUT_HW))


@pytest.fixture(scope="module")
def grads(fx, heads):
  """d total / d (raw, guide_wh) per level: ``(official non-detached, detached)``.

  Both in one jit so XLA shares the forward pass (one compile instead of two).
  """
  def grad(detach):
    cfg = default_loss_config()
    cfg.detach_anchor_targets = detach
    return jax.grad(lambda lv, lb: losses.head_loss(lv, lb, loss_config=cfg, num_classes=C,
                                                    input_hw=INPUT_HW)[0])
  both = jax.jit(lambda lv, lb: (grad(False)(lv, lb), grad(True)(lv, lb)))
  return jax.device_get(both(heads["levels"], fx["labels"]))


@pytest.fixture(scope="module")
def main_run(fx, heads):
  aux, tg = _components_and_targets(True)(heads["levels"], fx["labels6"])
  return jax.device_get(aux), jax.device_get(tg)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", ["main", "ls_off", "mixup"])
def test_components_match_official(case, fx, heads, main_run):
  prefix = {"main": "", "ls_off": "ls_off/", "mixup": "mixup/"}[case]
  if case == "main":
    aux = main_run[0]
  elif case == "mixup":
    aux, _ = _components_and_targets(True)(heads["levels"], fx["labels_mixup"])
  else:  # 5-column labels through head_loss
    _, aux = _head_loss_ls_off()(heads["levels"], fx["labels"])
  for k in losses.COMPONENTS:
    np.testing.assert_allclose(np.asarray(aux[k]), fx[f"{prefix}loss/{k}_per_level"],
                               rtol=1e-4, err_msg=f"{case} {k}")
    np.testing.assert_allclose(np.asarray(aux[k]).sum(), fx[f"{prefix}loss/{k}"],
                               rtol=1e-4, err_msg=f"{case} {k} (sum)")


def test_gradients_match_official(heads, grads):
  # Not detached (the official quirk). The stored grads are float32 autograd
  # results; our float32 grads differ by <= ~2e-6 absolute (largest |grad| ~3),
  # i.e. rounding. rtol 1e-3 is the README's suggestion for head gradients; the
  # atol 1e-5 covers rounding on near-zero entries (sigmoid(x) - t cancellation).
  g = grads[0]
  for l in range(3):
    for k in ("raw", "guide_wh"):
      ref, got = heads["grads"][l][k], np.asarray(g[l][k])
      np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-5, err_msg=f"level {l} {k}")
      assert np.linalg.norm(got - ref) <= 1e-4 * np.linalg.norm(ref)


def test_assignment_and_ignore_masks_match_official(fx, main_run):
  _, tg = main_run
  assign, best_n, overwritten = targets.assignment_table(tg)
  np.testing.assert_array_equal(assign, fx["assign"])
  np.testing.assert_array_equal(best_n, fx["assign_best_n"])
  np.testing.assert_array_equal(overwritten, fx["assign_overwritten"])
  # Assignment IoUs [best prior, predicted anchor-free] for each GT row.
  img, gt, lvl = fx["assign"][:, 0], fx["assign"][:, 1], fx["assign"][:, 2]
  prior = np.array([tg[l].best_prior_iou[b, t] for b, t, l in zip(img, gt, lvl)])
  free = np.array([tg[l].free_iou[b, t] for b, t, l in zip(img, gt, lvl)])
  np.testing.assert_allclose(np.stack([prior, free], 1), fx["assign_iou"], rtol=1e-5)
  for l in range(3):
    ours = np.asarray(tg[l].ignored).transpose(0, 3, 1, 2).astype(np.uint8)  # -> (B,4,H,W)
    np.testing.assert_array_equal(ours, fx[f"ignored_l{l}"], err_msg=f"ignored_l{l}")
    assert not np.asarray(tg[l].adjacent_ignored).any()
  # 17 GTs, one overwritten -> 16 responsible slots.
  assert sum(int(np.asarray(t.positive).sum()) for t in tg) == 16


def test_detach_anchor_targets_changes_only_wh_target_gradient(fx, grads, main_run):
  _, tg = main_run
  g0, g1 = grads
  batch = fx["labels"].shape[0]
  n_changed = 0
  for l in range(3):
    np.testing.assert_allclose(g1[l]["raw"], g0[l]["raw"], rtol=0, atol=1e-6)
    diff = np.asarray(g0[l]["guide_wh"] - g1[l]["guide_wh"]).reshape(*g0[l]["guide_wh"].shape[:3], 4, 2)
    pos = np.asarray(tg[l].positive)
    expected = np.where(pos, np.asarray(tg[l].tgt_scale) / batch, 0.0)[..., None]
    expected = np.broadcast_to(expected, diff.shape)
    np.testing.assert_allclose(np.abs(diff), expected, rtol=1e-4, atol=1e-6, err_msg=f"level {l}")
    n_changed += int(pos.sum())
  assert n_changed == 16


def test_adjacent_ignore_changes_obj_only(fx, heads, main_run):
  base = main_run[0]
  aux, tg = jax.device_get(_components_and_targets(True, 0.2)(heads["levels"], fx["labels6"]))
  for k in ("anchor", "iou", "l1", "xy", "wh", "cls"):
    # Same computation in two compiled programs: equal up to reduction order.
    np.testing.assert_allclose(np.asarray(aux[k]), np.asarray(base[k]), rtol=1e-6, err_msg=k)
  assert np.all(np.asarray(aux["obj"]) < np.asarray(base["obj"]))
  np.testing.assert_allclose(aux["total"], base["total"] - base["obj"] + aux["obj"], rtol=1e-6)
  for t in tg:  # positives always keep their weight
    assert np.all(np.asarray(t.obj_mask)[np.asarray(t.positive)] == 1.0)


def test_head_loss_jit_config_dict_no_host_transfers(fx, heads):
  """head_loss under jit (ConfigDict config), no implicit host<->device transfers."""
  fn = _head_loss_ls_off()
  labels = jax.device_put(fx["labels"])
  with jax.transfer_guard("disallow"):
    total, aux = fn(heads["levels"], labels)
    total.block_until_ready()
  assert set(aux) == set(losses.COMPONENTS + losses.STATS)
  assert all(v.shape == (3,) and v.dtype == jnp.float32 for v in aux.values())
  assert total.dtype == jnp.float32
  np.testing.assert_allclose(float(total), fx["ls_off/loss/total"], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(aux["cls"]), fx["ls_off/loss/cls_per_level"], rtol=1e-4)


# -------------------------------------------------------------------------- synthetic

SMALL_HW = (64, 64)  # level grids 2, 4, 8
SMALL_C = 3


def _zeros_heads(b, level, c=SMALL_C):
  s = targets.STRIDES[level]
  h, w = SMALL_HW[0] // s, SMALL_HW[1] // s
  return jnp.zeros((b, h, w, 4 * (5 + c))), jnp.zeros((b, h, w, 8))


@functools.lru_cache(maxsize=None)
def _small_targets_fn(level, label_smoothing):
  def run(labels):
    raw, gwh = _zeros_heads(labels.shape[0], level)
    return losses.level_loss(raw, gwh, labels, level=level, num_classes=SMALL_C,
                             input_hw=SMALL_HW, label_smoothing=label_smoothing,
                             return_targets=True)[1]
  return jax.jit(run)


def _targets(labels, level=2, label_smoothing=True):
  """Targets of one level of a 64x64 input with all-zero head outputs.

  Labels are padded to one shape (2, 5, 6) (mixup weight 1 where absent) so
  all synthetic cases share one compile per (level, label_smoothing).
  """
  lab = np.zeros((2, 5, 6), np.float32)
  b, n, k = labels.shape
  lab[:b, :n, :k] = labels
  if k == 5:
    lab[:b, :n, 5] = 1.0
  fn = _small_targets_fn(level, label_smoothing)
  return jax.device_get(fn(jnp.asarray(lab)))


def test_last_writer_wins_and_class_targets():
  # Three GTs, same L2 cell (j=2, i=3) and same prior 0 (10x13-ish) -> slot 0;
  # with guide_wh = 0 the anchor-free shape is 32x32, far worse than the prior.
  lab = np.zeros((1, 5, 5), np.float32)
  lab[0, 0] = [0, 28.5, 20.5, 10, 13]
  lab[0, 1] = [1, 29.5, 21.5, 11, 12]
  lab[0, 2] = [2, 30.5, 22.5, 9, 14]
  t_on = _targets(lab, label_smoothing=True)
  t_off = _targets(lab, label_smoothing=False)
  np.testing.assert_array_equal(t_on.slot[0, :3], [0, 0, 0])
  np.testing.assert_array_equal(t_on.overwritten[0, :3], [True, True, False])
  assert t_on.positive.sum() == 1 and t_on.positive[0, 2, 3, 0]
  np.testing.assert_allclose(t_on.box_target[0, 2, 3, 0], [30.5 / 8, 22.5 / 8, 9 / 8, 14 / 8])
  np.testing.assert_allclose(t_on.tgt_scale[0, 2, 3, 0], 2 - 9 * 14 / 64 ** 2)
  np.testing.assert_allclose(t_on.cls_target[0, 2, 3, 0], [1 / 3, 1 / 3, 2 / 3], rtol=1e-6)
  np.testing.assert_array_equal(t_off.cls_target[0, 2, 3, 0], [1, 1, 1])  # multi-hot quirk
  # Order matters, not values: reversing the rows makes row 2 (old row 0) win.
  t_rev = _targets(lab[:, [2, 1, 0, 3, 4]])
  np.testing.assert_allclose(t_rev.box_target[0, 2, 3, 0, 2:], [10 / 8, 13 / 8])


def test_slot3_shape_target_from_later_gt():
  # Same cell, different anchor-based slots: prior 0 (slot 0) then prior 1 (slot 1).
  lab = np.zeros((1, 4, 5), np.float32)
  lab[0, 0] = [0, 28.5, 20.5, 10, 13]
  lab[0, 1] = [1, 29.5, 21.5, 16, 30]
  t = _targets(lab)
  np.testing.assert_array_equal(t.slot[0, :2], [0, 1])
  assert not t.overwritten.any()
  np.testing.assert_array_equal(t.anchor_mask[0, 2, 3], [True, True, False, True])
  np.testing.assert_allclose(t.anchor_target_wh[0, 2, 3, 3], [16 / 8, 30 / 8])
  np.testing.assert_allclose(t.anchor_target_wh[0, 2, 3, 0], [10 / 8, 13 / 8])
  assert t.anchor_mask.sum() == 3 and t.positive.sum() == 2


def test_padding_rule_and_empty_image():
  lab = np.zeros((2, 3, 6), np.float32)
  lab[0, 0] = [0, 20.5, 20.5, 10, 13, 0.5]
  lab[0, 1, 5] = 1.0  # mixup column alone does not make a box
  np.testing.assert_array_equal(np.asarray(targets.gt_valid_mask(jnp.asarray(lab))),
                                [[True, False, False], [False, False, False]])
  t = _targets(lab)
  assert not t.ignored[1].any() and np.all(t.obj_mask[1] == 1.0)  # no GT: nothing ignored
  assert t.positive.sum() == 1
  np.testing.assert_allclose(t.obj_mask[t.positive], [0.5])  # mixup weight at the positive


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _adjacent(lab, gt_level, level, grid, eps):
  return targets.adjacent_ignore_mask(lab, gt_level, level=level, grid_hw=(grid, grid),
                                      input_hw=INPUT_HW, eps=eps)


def test_adjacent_ignore_geometry():
  # One GT on level 1 (prior 4 = 62x45) at 416x416: centre (100.5, 300.5).
  lab = np.zeros((1, 2, 5), np.float32)
  lab[0, 0] = [0, 100.5, 300.5, 62, 45]
  valid, best_n, _, gt_level, _ = jax.jit(targets.prior_assignment)(jnp.asarray(lab))
  assert int(best_n[0, 0]) == 4 and int(gt_level[0, 0]) == 1
  for level, grid in ((0, 13), (1, 26), (2, 52)):
    m = np.asarray(_adjacent(lab, gt_level, level, grid, 0.0))
    if level == 1:
      assert not m.any()
    else:
      s = 416 // grid
      assert m.sum() == 1 and m[0, int(300.5 // s), int(100.5 // s)]
  # eps = 0.5 on level 2 (stride 8): x in [85, 116] -> cols 10..14, y in [289.25, 311.75] -> rows 36..38.
  m = np.asarray(_adjacent(lab, gt_level, 2, 52, 0.5))
  rows, cols = np.nonzero(m[0])
  assert set(rows) == {36, 37, 38} and set(cols) == {10, 11, 12, 13, 14} and m.sum() == 15
  with pytest.raises(ValueError):
    targets.adjacent_ignore_mask(jnp.asarray(lab), gt_level, level=2, grid_hw=(52, 52),
                                 input_hw=INPUT_HW, eps=-1.0)


def test_input_validation():
  raw, gwh = _zeros_heads(1, 2)
  lab = jnp.zeros((1, 2, 5))
  with pytest.raises(ValueError):  # grid * stride != input
    losses.level_loss(raw, gwh, lab, level=1, num_classes=SMALL_C, input_hw=SMALL_HW)
  with pytest.raises(ValueError):  # wrong class count
    losses.level_loss(raw, gwh, lab, level=2, num_classes=4, input_hw=SMALL_HW)
  with pytest.raises(ValueError):  # labels rank
    losses.level_loss(raw, gwh, lab[0], level=2, num_classes=SMALL_C, input_hw=SMALL_HW)
  with pytest.raises(ValueError):
    losses.head_loss([dict(raw=raw, guide_wh=gwh)], lab, num_classes=SMALL_C, input_hw=SMALL_HW)


def _reference_level_targets(labels, level, label_smoothing, input_size=64, c=SMALL_C):
  """Sequential re-statement of spec §6 (one GT at a time, later GTs overwrite),
  for all-zero head outputs (guided anchors = priors, anchor-free = 4*stride).
  Returns None on a near-tie (the float rounding of either side could flip it)."""
  stride = targets.STRIDES[level]
  g = input_size // stride
  anchors = np.asarray(targets.ANCHORS, np.float64)
  mask = targets.ANCHOR_MASKS[level]
  b_, n_ = labels.shape[:2]
  pos = np.zeros((b_, g, g, 4), bool)
  box = np.zeros((b_, g, g, 4, 4))
  cls = np.zeros((b_, g, g, 4, c))
  amask = np.zeros((b_, g, g, 4), bool)
  awh = np.zeros((b_, g, g, 4, 2))
  def wh_iou(a, b):
    inter = min(a[0], b[0]) * min(a[1], b[1])
    return inter / (a[0] * a[1] + b[0] * b[1] - inter)
  for b in range(b_):
    for t in range(n_):
      k, cx, cy, w, h = labels[b, t, :5]
      if w == 0:
        break
      ious = np.array([wh_iou((w, h), an) for an in anchors])
      top2 = np.sort(ious)[-2:]
      free = wh_iou((w, h), (4 * stride, 4 * stride))
      if top2[1] - top2[0] < 1e-4 or abs(free - top2[1]) < 1e-4:
        return None
      best = int(np.argmax(ious))
      if best not in mask:
        continue
      a = mask.index(best)
      i, j = int(cx / stride), int(cy / stride)
      aa = 3 if free > ious[best] else a
      for s in (a, 3):
        amask[b, j, i, s] = True
        awh[b, j, i, s] = (w / stride, h / stride)
      pos[b, j, i, aa] = True
      box[b, j, i, aa] = (cx / stride, cy / stride, w / stride, h / stride)
      if label_smoothing:
        cls[b, j, i, aa] = 1 / c
        cls[b, j, i, aa, int(k)] = 1 - 1 / c
      else:
        cls[b, j, i, aa, int(k)] = 1
  return pos, box, cls, amask, awh


try:
  from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:  # pragma: no cover
  given = None

if given is not None:
  _cells_st = st.sampled_from([(1, 1), (1, 2), (6, 5)])
  _box_st = st.tuples(st.integers(0, SMALL_C - 1), _cells_st,
                      st.integers(1, 31), st.integers(1, 31),  # in-cell offset, 1/32 px*8
                      st.integers(16, 240), st.integers(16, 240))  # w, h in 1/4 px

  @settings(max_examples=40, deadline=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow])
  @given(boxes=st.lists(st.lists(_box_st, min_size=0, max_size=5), min_size=2, max_size=2),
         level=st.sampled_from([1, 2]), label_smoothing=st.booleans())
  def test_vectorised_assignment_matches_sequential_reference(boxes, level, label_smoothing):
    lab = np.zeros((2, 5, 5), np.float32)
    for b, rows in enumerate(boxes):
      for t, (k, (cj, ci), ox, oy, w4, h4) in enumerate(rows):
        # Centres on an 8-px lattice cell of level 2 (collisions are frequent).
        lab[b, t] = [k, ci * 8 + ox / 4, cj * 8 + oy / 4, w4 / 4, h4 / 4]
    ref = _reference_level_targets(lab, level, label_smoothing)
    if ref is None:
      return
    pos, box, cls, amask, awh = ref
    t = _targets(lab, level=level, label_smoothing=label_smoothing)
    np.testing.assert_array_equal(t.positive, pos)
    np.testing.assert_allclose(t.box_target, box, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t.cls_target, cls, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(t.anchor_mask, amask)
    np.testing.assert_allclose(t.anchor_target_wh, awh, rtol=1e-6, atol=1e-6)
    expect_obj = np.where(pos, 1.0, np.where(t.ignored, 0.0, 1.0))
    np.testing.assert_array_equal(t.obj_mask, expect_obj)


def test_huge_unconstrained_outputs_keep_gradients_finite():
  """tw/th/guide_wh far beyond exp()'s float32 range where no box term looks must not poison grads.

  Regression: a digits run hit th ≈ 90 at non-positive cells (exp → inf) and
  every gradient became NaN through ``where(pos, 1 - iou², 0)``. The loss value
  must be the same as with ordinary values there, the gradient finite.
  """
  level = 2  # stride 8; the GT's best prior (16, 30) is anchor 1 of this level
  raw, gwh = _zeros_heads(2, level)
  lab = np.zeros((2, 5, 6), np.float32)
  lab[0, 0] = (1, 20.0, 24.0, 18.0, 26.0, 1.0)  # one GT: a positive at one cell and slot
  lab = jnp.asarray(lab)

  @jax.jit  # one compile each; eager op-by-op dispatch of the loss is slower on CPU
  def components(raw, gwh):
    return losses.level_loss(raw, gwh, lab, level=level, num_classes=SMALL_C, input_hw=SMALL_HW)

  def loss(raw, gwh):
    return components(raw, gwh)["total"]

  _, t = losses.level_loss(raw, gwh, lab, level=level, num_classes=SMALL_C, input_hw=SMALL_HW,
                           return_targets=True)
  sel = np.asarray(t.positive | t.anchor_mask)  # (B, H, W, 4)
  assert sel.sum() >= 1
  b, h, w = raw.shape[:3]
  huge_raw = np.asarray(raw).reshape(b, h, w, 4, -1).copy()
  huge_raw[..., 2:4] = np.where(sel[..., None], 0.0, 120.0)  # exp(120) = inf in float32
  huge_g = np.where(sel[..., None], 0.0, 95.0) * np.ones((b, h, w, 4, 2), np.float32)
  huge_raw = jnp.asarray(huge_raw.reshape(raw.shape))
  huge_g = jnp.asarray(huge_g.reshape(gwh.shape), jnp.float32)
  c0, c1 = components(raw, gwh), components(huge_raw, huge_g)
  for k in ("anchor", "iou", "l1", "cls"):  # obj may differ: the ignore mask sees inf boxes
    np.testing.assert_allclose(float(c1[k]), float(c0[k]), rtol=1e-6, err_msg=k)
  v1, (g_raw, g_g) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(huge_raw, huge_g)
  assert np.isfinite(float(v1))
  assert np.all(np.isfinite(np.asarray(g_raw))) and np.all(np.isfinite(np.asarray(g_g)))


def test_runaway_scale_at_a_positive_keeps_gradients_finite_and_ordinary_values_identical():
  """tw/th/guide_wh beyond exp()'s range *where the box terms look* (``max_log_scale``).

  Regression: the default digits run skipped 2–12 updates per run because one
  positive had tw ≈ 256 at level 0: ``w·h`` of the decoded box was inf and its
  backward 0 · inf = NaN in every gradient leaf (the loss itself finite). With
  the cap the gradient is finite; without it (``None``, the official code) it is
  NaN — so this test fails if the cap stops working. Below the cap the loss and
  its gradient are bit-identical to the uncapped (official) formulation.
  """
  level = 2
  raw, gwh = _zeros_heads(2, level)
  lab = np.zeros((2, 5, 6), np.float32)
  lab[0, 0] = (1, 20.0, 24.0, 18.0, 26.0, 1.0)
  lab[1, 0] = (2, 40.0, 36.0, 30.0, 12.0, 1.0)
  lab = jnp.asarray(lab)

  def fns(cap):
    def loss(raw, gwh):
      return losses.level_loss(raw, gwh, lab, level=level, num_classes=SMALL_C,
                               input_hw=SMALL_HW, max_log_scale=cap)["total"]
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

  capped, official = fns(losses.MAX_LOG_SCALE), fns(None)
  _, t = losses.level_loss(raw, gwh, lab, level=level, num_classes=SMALL_C, input_hw=SMALL_HW,
                           return_targets=True)
  pos = np.asarray(t.positive)  # (B, H, W, 4)
  assert pos[0].sum() >= 1 and pos[1].sum() >= 1
  b, h, w = raw.shape[:3]

  # Ordinary values (|x| ≤ 3, below the cap): bit-identical value and gradients.
  rng = np.random.default_rng(0)
  r = jnp.asarray(rng.uniform(-3, 3, raw.shape), jnp.float32)
  g = jnp.asarray(rng.uniform(-3, 3, gwh.shape), jnp.float32)
  (v0, g0), (v1, g1) = official(r, g), capped(r, g)
  assert float(v0) == float(v1)
  for a, c in zip(g0, g1):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))

  # A runaway tw at one positive of image 0, a runaway guide_wh at one of image 1.
  huge_r = np.asarray(r).reshape(b, h, w, 4, -1).copy()
  i0 = tuple(np.argwhere(pos[0])[0])
  huge_r[(0,) + i0 + (2,)] = 256.0
  huge_g = np.asarray(g).reshape(b, h, w, 4, 2).copy()
  i1 = tuple(np.argwhere(pos[1])[0])
  huge_g[(1,) + i1 + (1,)] = 120.0
  huge_r = jnp.asarray(huge_r.reshape(raw.shape))
  huge_g = jnp.asarray(huge_g.reshape(gwh.shape))
  v_off, (gr_off, gg_off) = official(huge_r, huge_g)
  assert np.isfinite(float(v_off))  # the loss is finite ...
  assert not np.all(np.isfinite(np.asarray(gr_off)))  # ... its gradient is not (the bug)
  v_cap, (gr_cap, gg_cap) = capped(huge_r, huge_g)
  assert np.isfinite(float(v_cap))
  assert np.all(np.isfinite(np.asarray(gr_cap))) and np.all(np.isfinite(np.asarray(gg_cap)))
  # The wh L1 still sees the raw tw = 256: its gradient there is tgt_scale / B, sign +.
  gr_cap = np.asarray(gr_cap).reshape(b, h, w, 4, -1)
  assert gr_cap[(0,) + i0 + (2,)] > 0
