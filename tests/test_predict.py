"""The Python API (``asff_jax.Detector``) and ``predict`` on files, folders, globs and videos.

A tiny model with random weights written as a workdir (what ``convert`` writes):
the numbers mean nothing, but every detection the API returns must be the one
``predict`` writes, drawn where its box is, and mapped to original pixels.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from asff_jax import Detector
from asff_jax.errors import DataError, MissingFileError
from asff_jax.models import create_model
from asff_jax.tools import predict
from asff_jax.training import checkpoints
from tests.conftest import random_variables, tiny_config

REPO = Path(__file__).resolve().parents[1]
SCORE_THRE = 0.02


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("predict")
  config = tiny_config()
  config.dataset.class_names = ["a", "b", "c"]
  config.dataset.category_ids = [3, 7, 11]
  checkpoints.write_workdir(str(tmp / "run"), random_variables(create_model(config), seed=1), config)
  rng = np.random.default_rng(0)
  for folder, (h, w) in (("x", (64, 64)), ("y", (90, 120)), ("y/deeper", (150, 70))):
    (tmp / "in" / folder).mkdir(parents=True)
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    Image.fromarray(base).resize((w, h), Image.BILINEAR).save(tmp / "in" / folder / "img.png")
  return tmp


@pytest.fixture(scope="module")
def detector(workdir):
  return Detector.from_workdir(str(workdir / "run"), score_thre=SCORE_THRE, batch_size=2)


def test_api_single_and_list_agree_and_are_in_original_pixels(workdir, detector):
  images = [predict.load_image(p) for p in sorted((workdir / "in").rglob("*.png"))]
  one = detector(images[1])
  many = detector(images)
  assert len(many) == 3 and len(one) > 0
  np.testing.assert_allclose(one.boxes, many[1].boxes, atol=1e-4)
  for im, d in zip(images, many):
    h, w = im.shape[:2]
    assert d.boxes.shape == (len(d), 4) and d.boxes.dtype == np.float32
    assert np.all(d.boxes >= 0) and np.all(d.boxes[:, [0, 2]] <= w) and np.all(d.boxes[:, [1, 3]] <= h)
    assert np.all(np.diff(d.scores) <= 0) and np.all(d.scores >= SCORE_THRE)
    assert [detector.class_names[c] for c in d.classes] == d.class_names
    assert list(d.category_ids) == [[3, 7, 11][c] for c in d.classes]
  # gray and float images are accepted; bad arrays are refused with a clear error
  gray = images[0].mean(-1)
  assert len(detector(gray)) >= 0
  with pytest.raises(DataError, match="expected an \\(H, W, 3\\) RGB image"):
    detector(np.zeros((4, 4, 5), np.uint8))


def test_fusion_maps(detector, workdir):
  maps = detector.fusion_maps(predict.load_image(workdir / "in" / "y" / "img.png"))
  assert [w.shape for w in maps["weights"]] == [(2, 2, 3), (4, 4, 3), (8, 8, 3)]
  for w in maps["weights"]:
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)  # α + β + γ = 1 (paper Eq. 2)
  assert [f.shape for f in maps["fused_sum"]] == [(2, 2), (4, 4), (8, 8)]


def _video(path, frames=5, hw=(64, 96)):
  c = av.open(str(path), "w")
  s = c.add_stream("mpeg4", rate=10)
  s.height, s.width = hw
  s.pix_fmt = "yuv420p"
  for i in range(frames):
    f = np.full((*hw, 3), 40, np.uint8)
    f[10:40, 5 + 6 * i:35 + 6 * i] = 220
    for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
      c.mux(p)
  for p in s.encode():
    c.mux(p)
  c.close()


def test_predict_folders_globs_videos_unique_names_and_drawn_boxes(workdir, detector, tmp_path):
  _video(tmp_path / "clip.mp4")
  out = tmp_path / "out"
  res = predict.predict_inputs(detector, [str(workdir / "in"), str(workdir / "in" / "x" / "*.png"),
                                          str(tmp_path / "clip.mp4")], str(out), every=2)
  files = sorted(str(p) for p in (workdir / "in").rglob("*.png"))
  assert sorted(res["detections"]) == files and not res["failed"]  # the glob's file is not listed twice
  # three inputs named img.png in three folders: three outputs
  names = predict.output_names(predict.expand_inputs([str(workdir / "in"), str(tmp_path / "clip.mp4")]))
  drawn = sorted(str(p.relative_to(out)) for p in out.rglob("img.png"))
  assert len(drawn) == 3 and [d.split("/", 1)[1] for d in drawn] == ["in/x/img.png", "in/y/deeper/img.png",
                                                                       "in/y/img.png"]
  saved = json.loads((out / "detections.json").read_text())
  for f in files:
    ref = detector(predict.load_image(f))
    rows = saved["detections"][f]
    assert len(rows) == len(ref) > 0
    np.testing.assert_allclose([r["bbox"] for r in rows], ref.boxes, atol=0.011)  # the API == predict
    # the boxes are drawn where the detections are: the outline colour on the box's left edge
    name = names[Path(f)] + ".png"
    im = np.asarray(Image.open(out / name).convert("RGB"))
    orig = predict.load_image(f)
    top = rows[-1]  # drawn last, so nothing covers its outline
    x1, y1, x2, y2 = (int(round(v)) for v in top["bbox"])
    colour = predict.PALETTE[top["class"] % len(predict.PALETTE)]
    ys = slice(min(max(y1 + 13, 0), im.shape[0] - 1), max(min(y2, im.shape[0]), y1 + 14))  # below the label
    col = im[ys, min(max(x1, 0), im.shape[1] - 1)]
    assert np.all(col == colour) and not np.all(orig[ys, min(max(x1, 0), im.shape[1] - 1)] == colour)
  # the video: every 2nd of 5 frames -> 3 annotated frames and 3 JSON lines
  assert res["videos"] == {str(tmp_path / "clip.mp4"): 3}
  clip = out / (names[tmp_path / "clip.mp4"] + ".jsonl")
  lines = [json.loads(l) for l in clip.read_text().splitlines()]
  assert [l["frame"] for l in lines] == [0, 2, 4] and all("detections" in l for l in lines)
  with av.open(str(clip.with_suffix(".mp4"))) as c:
    assert sum(1 for _ in c.decode(video=0)) == 3


def test_predict_errors(detector, tmp_path):
  with pytest.raises(MissingFileError, match="no such file or folder"):
    predict.expand_inputs([str(tmp_path / "nope")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(MissingFileError, match="holds no images"):
    predict.expand_inputs([str(tmp_path / "empty")])
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8\xff not a jpeg")
  badv = tmp_path / "bad.mp4"
  badv.write_bytes(b"nope")
  res = predict.predict_inputs(detector, [str(bad), str(badv)], str(tmp_path / "o"))
  assert set(res["failed"]) == {str(bad), str(badv)} and "not a readable" in res["failed"][str(badv)]


def test_predict_cli_pth(workdir, tmp_path):
  """``predict --pth F.pth --config FILE``: official weights converted on the fly."""
  torch = pytest.importorskip("torch")
  from asff_jax.tools.convert import variables_to_official  # pylint: disable=import-outside-toplevel  (the test's own)

  config = tiny_config()
  sd = variables_to_official(checkpoints.load_variables(str(workdir / "run"))[0], config)
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "w.pth")
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, "-m", "asff_jax.predict", f"--pth={tmp_path / 'w.pth'}",
                      f"--config={REPO / 'configs' / 'tiny.py'}", "--inputs", str(workdir / "in" / "x"),
                      f"--out={out}", f"--score_thre={SCORE_THRE}"], capture_output=True, text=True, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  det = json.loads((out / "detections.json").read_text())
  (rows,) = det["detections"].values()
  ref = Detector.from_workdir(str(workdir / "run"), score_thre=SCORE_THRE)(
      predict.load_image(workdir / "in" / "x" / "img.png"))
  np.testing.assert_allclose([r["bbox"] for r in rows], ref.boxes, atol=0.011)
