"""Op-level time profile of a compiled XLA function (``python -m asff_jax.benchmark --what profile``).

Runs the function under :func:`jax.profiler.trace` (Perfetto JSON), takes the
duration of every executed HLO instruction of the entry computation (on CPU
each is a "thunk" named after the instruction), and joins them with the
compiled HLO text to say *where* the time goes:

* **region** — from the instruction's ``op_name`` metadata, which carries the
  Flax module path: ``backbone``, ``neck``, ``fusion`` (ASFF / sum / concat
  modules), ``dcn`` (the heads' deformable convs), ``head`` (the rest of the
  heads), ``decode/loss/optimizer`` (everything outside the model's modules);
* **pass** — ``backward`` when the op comes from a ``transpose(...)`` of the
  autodiff (the gradient), else ``forward``;
* **kind** — ``conv``, ``conv-weight-grad`` (a conv's kernel gradient, which
  XLA's CPU backend rewrites as a convolution whose window covers the whole
  input, dropping the metadata: its layer is unknown, so its region is
  ``conv kernel gradients``; on CPU the convs that
  :mod:`asff_jax.models.conv_grad` takes compute it as per-tap matmuls instead,
  counted as ``dot`` in their layer's backward pass), ``conv-lhs-dilated`` (a convolution over an input with
  zeros inserted: XLA's form of the input gradient of a stride-2 conv, whose
  FLOPs are mostly multiplications by those zeros), ``dot`` (matmuls: the DCN's column contraction, …),
  ``gather``, ``scatter``, ``reduce`` (BN statistics, loss sums), ``copy`` (pure
  layout: copies, transposes), ``elementwise`` (every other fusion);
* **FLOPs** of convolutions and dots from their shapes (2 · output elements ·
  contraction size; zero-padded border taps included, which XLA's cost analysis
  leaves out — a few % more for 3×3 convs on small maps), hence the achieved GFLOP/s of the conv and dot work per
  region, next to a matmul peak measured by the caller.

The instruction names and metadata are XLA's; a name that appears in the trace
but not in the entry computation (runtime bookkeeping) is ignored, and the
summed op time is reported next to the wall time of a call.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time
from typing import Callable

import jax

REGIONS = ("backbone", "neck", "fusion", "dcn", "head", "conv kernel gradients", "decode/loss/optimizer")
KINDS = ("conv", "conv-weight-grad", "conv-lhs-dilated", "dot", "gather", "scatter", "reduce", "copy", "elementwise")
_LAYOUT_OPS = {"parameter", "copy", "transpose", "bitcast", "reshape", "broadcast", "constant", "tuple",
               "get-tuple-element", "slice", "concatenate", "pad"}
_HEAVY = ("convolution", "dot", "gather", "scatter")
_SHAPE = re.compile(r"(pred|[a-z]+\d+)\[([\d,]*)\]")


def _split_instruction(line: str):
  """``(name, shape_text, opcode, rest)`` of one HLO instruction line, or None."""
  m = re.match(r"\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$", line)
  if not m:
    return None
  name, rest = m.group(1), m.group(2)
  if rest.startswith("("):  # tuple shape: skip the balanced parentheses
    depth = 0
    for k, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    shape, rest = rest[:k + 1], rest[k + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  m = re.match(r"([\w-]+)\((.*)$", rest)
  if not m:
    return None
  return name, shape, m.group(1), m.group(2)


def _dims(shape_text: str) -> list[int]:
  m = _SHAPE.search(shape_text)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _flops(opcode: str, shape: str, rest: str, shapes: dict[str, str]) -> float:
  """FLOPs of a convolution or dot instruction from its shapes (0 for anything else).

  ``shapes`` maps the computation's instruction names to their shape text (operands
  are printed by name only).
  """
  out = math.prod(_dims(shape))
  names = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
  operands = [_dims(shapes.get(n, "")) for n in names]
  if opcode == "convolution" and len(operands) >= 2:
    kernel = operands[1]
    labels = re.search(r"dim_labels=\w+_(\w+)->", rest)
    if labels and len(labels.group(1)) == len(kernel):
      o = labels.group(1).index("o")
      return 2.0 * out * math.prod(kernel) / max(kernel[o], 1)
  if opcode == "dot" and operands:
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    if contract:
      k = math.prod(operands[0][int(i)] for i in contract.group(1).split(",") if i)
      return 2.0 * out * k
  return 0.0


def _op_name(line: str) -> str:
  m = re.search(r'op_name="([^"]*)"', line)
  return m.group(1) if m else ""


def _is_weight_grad(line: str) -> bool:
  """A convolution without metadata: XLA's CPU rewrite of a conv's kernel gradient.

  The backend turns the kernel gradient into a convolution whose window spans the
  activations and whose output is the kernel's taps, and the rewrite drops the
  instruction's metadata, so the layer is unknown. Every convolution the model
  itself (forward or input gradient) emits keeps its ``op_name``.
  """
  return "op_name=" not in line


def parse_hlo(hlo_text: str) -> dict[str, dict]:
  """Entry-computation instructions of compiled HLO text: name → ``{opcode, op_name, kind, flops}``."""
  comps: dict[str, list] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$", line)
    if head and not line.startswith(" "):
      current = head.group(2)
      comps[current] = []
      if head.group(1):
        entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      parsed = _split_instruction(line)
      if parsed:
        comps[current].append((parsed, line))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")

  shapes = {c: {p[0]: p[1] for p, _ in instrs} for c, instrs in comps.items()}

  def inner(comp: str, seen=None) -> list:
    """Instructions of a computation including nested fusions / calls."""
    seen = seen or set()
    out = []
    for (name, shape, opcode, rest), line in comps.get(comp, []):
      out.append((opcode, shape, rest, line, comp))
      for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
        if callee not in seen and callee in comps:
          seen.add(callee)
          out.extend(inner(callee, seen))
    return out

  ops = {}
  for (name, shape, opcode, rest), line in comps[entry]:
    body = [(opcode, shape, rest, line, entry)]
    for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
      body += inner(callee)
    codes = {b[0] for b in body}
    target = re.search(r'custom_call_target="([^"]*)"', line)
    target = target.group(1).lower() if target else ""
    if any(o == "convolution" and _is_weight_grad(l) for o, _, _, l, _ in body):
      kind = "conv-weight-grad"
    elif any(o == "convolution" and "lhs_dilate=" in l for o, _, _, l, _ in body):
      kind = "conv-lhs-dilated"  # input gradient of a strided conv: zeros inserted into its input
    elif "convolution" in codes or "conv" in target:
      kind = "conv"
    elif "dot" in codes or "matmul" in target or "gemm" in target:
      kind = "dot"
    elif "scatter" in codes:
      kind = "scatter"
    elif "gather" in codes:
      kind = "gather"
    elif "reduce" in codes or "reduce-window" in codes:
      kind = "reduce"
    elif codes <= _LAYOUT_OPS:
      kind = "copy"
    else:
      kind = "elementwise"
    flops = sum(_flops(o, s, r, shapes[c]) for o, s, r, _, c in body if o in ("convolution", "dot"))
    # A fusion's own op_name is often that of an elementwise root without the module path;
    # the heavy instruction inside (conv, dot, gather, scatter) names the layer.
    heavy = [n for n in (_op_name(b[3]) for b in body if b[0] in _HEAVY) if n]
    in_model = [n for n in map(_op_name, [line] + [b[3] for b in body]) if region_of(n) != REGIONS[-1]]
    op_name = (heavy or in_model or [_op_name(line)])[0]
    ops[name] = {"opcode": opcode, "op_name": op_name, "kind": kind, "flops": flops}
  return ops


def region_of(op_name: str) -> str:
  """Region (see the module docstring) of an ``op_name`` from the HLO metadata."""
  if "/dconv" in op_name:
    return "dcn"
  for key, region in (("/backbone/", "backbone"), ("/neck/", "neck"), ("/fusion_", "fusion"),
                      ("/head_", "head")):
    if key in op_name:
      return region
  return "decode/loss/optimizer"


def trace_op_times(run: Callable[[], object], runs: int = 3, trace_dir: str | None = None) -> dict[str, float]:
  """Mean seconds per call of every traced op name over ``runs`` calls of ``run``."""

  jax.block_until_ready(run())  # warm-up outside the trace
  with tempfile.TemporaryDirectory() as tmp:
    d = trace_dir or tmp
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(runs):
        jax.block_until_ready(run())
    files = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
      raise RuntimeError(f"jax.profiler.trace wrote no perfetto_trace.json.gz under {d}")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
      data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  times: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X":
      times[e["name"]] += float(e.get("dur", 0.0)) * 1e-6 / runs
  return dict(times)


def median_time(fn: Callable[[], object], repeats: int) -> float:
  """Median wall seconds of ``repeats`` (≥ 1) calls of ``fn`` (each waited for with ``block_until_ready``)."""


  times = []
  for _ in range(max(int(repeats), 1)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(sorted(times)[len(times) // 2])


def profile_compiled(compiled, run: Callable[[], object], *, runs: int = 3, wall_s: float | None = None) -> dict:
  """Time breakdown of one compiled function; see the module docstring.

  Returns a JSON-friendly ``{'total_s', 'wall_s', 'op_time_over_wall', 'by_region', 'by_kind',
  'top_ops'}``: ``wall_s`` as given, else measured; ``total_s`` the summed op time per call,
  which can exceed ``wall_s`` when XLA runs independent ops on several threads at once;
  ``by_region`` / ``by_kind`` keyed ``"region/pass"`` / ``"kind/pass"``, each entry with
  ``seconds``, ``share`` (of ``total_s``), ``gflop`` and ``gflops`` (conv + dot FLOPs over their time).
  """
  ops = parse_hlo(compiled.as_text())
  times = trace_op_times(run, runs=runs)
  matched = {n: t for n, t in times.items() if n in ops}
  total = sum(matched.values())
  wall = wall_s if wall_s is not None else median_time(run, runs)

  def acc(key_fn):
    out = collections.defaultdict(lambda: {"seconds": 0.0, "flop": 0.0, "mm_seconds": 0.0})
    for n, t in matched.items():
      o = ops[n]
      a = out[key_fn(o)]
      a["seconds"] += t
      if o["kind"] in ("conv", "conv-weight-grad", "conv-lhs-dilated", "dot"):
        a["flop"] += o["flops"]
        a["mm_seconds"] += t
    return {k: {"seconds": v["seconds"], "share": v["seconds"] / total if total else float("nan"),
                "gflop": v["flop"] / 1e9,
                "gflops": v["flop"] / v["mm_seconds"] / 1e9 if v["mm_seconds"] else float("nan")}
            for k, v in sorted(out.items(), key=lambda kv: -kv[1]["seconds"])}

  passes = lambda o: "backward" if ("transpose(" in o["op_name"] or o["kind"] == "conv-weight-grad") \
      else "forward"
  region = lambda o: "conv kernel gradients" if o["kind"] == "conv-weight-grad" else region_of(o["op_name"])
  top = sorted(matched.items(), key=lambda kv: -kv[1])[:15]
  return {
      "total_s": total,
      "wall_s": wall,
      "op_time_over_wall": total / wall if wall else float("nan"),
      "by_region": acc(lambda o: f"{region(o)}/{passes(o)}"),
      "by_kind": acc(lambda o: f"{o['kind']}/{passes(o)}"),
      "top_ops": [{"name": n, "seconds": t, "kind": ops[n]["kind"], "region": region(ops[n]),
                   "gflop": ops[n]["flops"] / 1e9} for n, t in top],
  }


def format_profile(prof: dict, peak_gflops: float | None = None) -> str:
  """Text tables of :func:`profile_compiled` output."""
  lines = [f"op time {prof['total_s'] * 1e3:.1f} ms per call, wall {prof['wall_s'] * 1e3:.1f} ms "
           f"(op time / wall {prof['op_time_over_wall']:.2f})"]
  for title in ("by_region", "by_kind"):
    lines.append(f"  {title.replace('_', ' ')}:   ms    share   conv+dot GFLOP   GFLOP/s" +
                 ("   % peak" if peak_gflops else ""))
    for k, v in prof[title].items():
      pk = (f"   {100 * v['gflops'] / peak_gflops:5.1f}" if peak_gflops and v["gflop"] else "")
      lines.append(f"    {k:<32} {v['seconds'] * 1e3:8.1f}  {100 * v['share']:5.1f}%  {v['gflop']:10.2f}  "
                   f"{v['gflops'] if v['gflop'] else float('nan'):9.1f}{pk}")
  return "\n".join(lines)
