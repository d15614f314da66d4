"""Where the collective bytes and the bytes accessed of a compiled program go, from its HLO text.

Reads the HLO that ``python -m benchmarks.tpu_compile_probe ... --dump-hlo FILE`` writes and
prints two tables, per chip per step (a loop body's instructions once per trip,
:mod:`engram_jax.hlo`):

1. every collective, largest first: kind, operand shapes, runs per step, the bytes counted as
   ``engram-jax compile`` counts them (operands), and what it does. libtpu lowers some
   all-gathers as an all-reduce of a zero-filled buffer into which each chip wrote its own
   shard (a ``dynamic-update-slice``): those are marked ``gather``, the others ``sum``;
2. bytes read and written by the top-level instructions (operands + outputs of every fusion,
   copy, collective ..., not inside fusions), by the largest shapes they touch: an
   approximation of XLA's ``bytes accessed`` to see which tensors dominate it.

    python -m benchmarks.hlo_breakdown /tmp/step.hlo [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import math
import re

from engram_jax import hlo

_NOT_KERNELS = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "conditional",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
}
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


class Program:
    def __init__(self, text: str):
        self.comps, _ = hlo.computations(text)
        self.counts = hlo.execution_counts(text)
        self.defs = {}  # instruction name -> (computation, (name, type, op, args), line)
        for comp, lines in self.comps.items():
            for line in lines:
                parsed = hlo.split_instruction(line)
                if parsed:
                    self.defs[parsed[0]] = (comp, parsed, line)
        self.fused = {  # computations called by a fusion or a reduction: not kernels themselves
            c
            for lines in self.comps.values()
            for line in lines
            if " fusion(" in line or "to_apply=" in line
            for c in re.findall(r"\b(?:calls|to_apply)=%?([\w.\-]+)", line)
        }

    def operand_names(self, args: str) -> list[str]:
        return [a.split()[-1].lstrip("%") for a in hlo.split_args(args) if a.split()]

    def writes_a_shard(self, name: str, depth: int = 0) -> bool:
        """Is ``name`` a dynamic-update-slice (through copies, converts, bitcasts), or a
        fusion whose root is one: the chip's shard written into a zero-filled buffer."""
        if name not in self.defs or depth > 4:
            return False
        _, (_, _, op, args), line = self.defs[name]
        if op == "dynamic-update-slice":
            return True
        if op in ("copy", "copy-start", "copy-done", "bitcast", "convert"):
            return self.writes_a_shard(self.operand_names(args)[0], depth + 1)
        if op == "fusion" and _CALLS.search(line):
            body = self.comps.get(_CALLS.search(line).group(1), [])
            return any(x.lstrip().startswith("ROOT") and "dynamic-update-slice(" in x for x in body)
        return False


def _bytes(type_text: str) -> int:
    return sum(hlo.BYTES.get(dt, 4) * math.prod(shape) for dt, shape in hlo.shapes(type_text))


def collective_rows(prog: Program, colls: list) -> tuple[list[tuple], collections.Counter]:
    """``([(collective, what, op_name)], bytes per step by kind)``, largest first; an
    all-reduce's operands are told apart one by one (XLA combines gathers and sums)."""
    rows, totals = [], collections.Counter()
    for c in colls:
        _, (_, _, _, args), line = prog.defs[c.name]
        kinds = [""] * len(c.operands)
        if c.op == "all-reduce":
            names = prog.operand_names(args)
            kinds = ["gather" if prog.writes_a_shard(n) else "sum" for n in names]
        for kind, (dt, shape) in zip(kinds, c.operands):
            totals[f"{c.op} {kind}".strip()] += c.count * hlo.BYTES.get(dt, 4) * math.prod(shape)
        op_name = _OP_NAME.search(line)
        rows.append((c, "+".join(sorted(set(kinds))), op_name.group(1) if op_name else ""))
    return sorted(rows, key=lambda r: -r[0].step_bytes), totals


def accessed_by_shape(prog: Program) -> collections.Counter:
    """Bytes (operands + outputs) x runs per step of every top-level instruction, keyed by
    the largest array it touches (dtype-free shape)."""
    out: collections.Counter = collections.Counter()
    types = {name: parsed[1] for name, (_, parsed, _) in prog.defs.items()}
    for comp, lines in prog.comps.items():
        if comp in prog.fused:
            continue
        runs = prog.counts.get(comp, 1)
        for line in lines:
            parsed = hlo.split_instruction(line)
            if not parsed or parsed[2] in _NOT_KERNELS:
                continue
            texts = [parsed[1]] + [types.get(n, "") for n in prog.operand_names(parsed[3])]
            shapes = [shape for t in texts for _, shape in hlo.shapes(t)]
            largest = max(shapes, key=math.prod, default=())
            out[str(list(largest))] += runs * sum(_bytes(t) for t in texts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hlo_file")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    with open(a.hlo_file) as f:
        text = f.read()
    prog = Program(text)
    rows, totals = collective_rows(prog, hlo.collectives(text))
    print("| GiB/step | kind | what | runs | operands | op_name |\n|---:|---|---|---:|---|---|")
    for c, what, op_name in rows[: a.top]:
        shapes = ", ".join(f"{dt}{list(s)}" for dt, s in c.operands)
        if c.step_bytes >= 2**20:
            print(f"| {c.step_bytes / 2**30:.3f} | {c.op} | {what} | {c.count} | {shapes} | "
                  f"{op_name[-80:]} |")  # fmt: skip
    print("\ntotals GiB/step:", {k: round(v / 2**30, 3) for k, v in sorted(totals.items())})
    accessed = accessed_by_shape(prog)
    total = sum(accessed.values())
    print(f"\ntop-level bytes accessed: {total / 1e12:.3f} TB/step; by the largest shape touched:")
    for shape, b in accessed.most_common(a.top):
        print(f"{b / 1e9:9.1f} GB {100 * b / total:5.1f}%  {shape}")


if __name__ == "__main__":
    main()
