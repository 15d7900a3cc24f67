"""Progress display for long phases (dataset preparation, training, evaluation).

:func:`bar` returns a ``tqdm`` bar when stderr is a terminal, and otherwise a
reporter with the same ``update``/``set_postfix_str``/``close`` methods that
logs one line at most every ``every_s`` seconds (logs and CI output stay
readable). ``enabled=False`` gives a silent one (library use, multi-host
followers).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from tqdm import tqdm

logger = logging.getLogger("asff_jax")


class _LineReporter:
  """``tqdm``-like progress that logs ``desc: n/total (rate/s, ETA) postfix`` every ``every_s`` seconds."""

  def __init__(self, total: Optional[int], desc: str, unit: str, every_s: float, initial: int = 0):
    self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
    self.n = self._n0 = initial
    self._t0 = self._last = time.time()
    self._postfix = ""

  def update(self, k: int = 1) -> None:
    self.n += k
    now = time.time()
    if now - self._last >= self.every_s or (self.total is not None and self.n >= self.total):
      self._last = now
      rate = (self.n - self._n0) / max(now - self._t0, 1e-9)
      done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
      eta = ""
      if self.total and rate > 0:
        eta = f", ETA {_hms((self.total - self.n) / rate)}"
      logger.info("%s: %s %s (%.1f %s/s%s)%s", self.desc, done, self.unit, rate, self.unit, eta,
                  f"  {self._postfix}" if self._postfix else "")

  def set_postfix_str(self, s: str, refresh: bool = True) -> None:  # noqa: ARG002
    del refresh
    self._postfix = s

  def close(self) -> None:
    pass


class _Silent:
  n = 0

  def update(self, k: int = 1) -> None:
    self.n += k

  def set_postfix_str(self, s: str, refresh: bool = True) -> None:
    del s, refresh

  def close(self) -> None:
    pass


def _hms(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def bar(total: Optional[int], desc: str, *, unit: str = "it", enabled: bool = True,
        every_s: float = 30.0, initial: int = 0):
  """A progress bar / periodic reporter for ``total`` units (see the module docstring)."""
  if not enabled:
    return _Silent()
  if sys.stderr.isatty():
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, leave=True)
  return _LineReporter(total, desc, unit, every_s, initial=initial)
