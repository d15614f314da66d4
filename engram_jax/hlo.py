"""Collectives of a compiled XLA program, read from its HLO text.

Used by tests to pin where the communication goes: ``collectives(compiled_text)`` lists every
all-reduce / all-gather / all-to-all / reduce-scatter / collective-permute (and their async
``-start`` forms) with the shapes and bytes of its operands. Get the text with
``jax.jit(f).lower(*args).compile().as_text()``.

Compiled HLO often prints operands by name only (``all-gather(%param.1)``), so operand shapes
are resolved through the defining instruction of each name.

Loops: a collective inside a while loop's body (e.g. a ``lax.scan`` over layers) is printed
once but runs once per trip: ``Collective.count`` is how many times it runs per execution of
the program (the product of the enclosing loops' ``known_trip_count``s; 1 where XLA does not
know the trip count), and ``Collective.step_bytes`` its bytes per execution.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

COLLECTIVE_OPS = (
    "all-reduce",
    "all-gather",
    "all-to-all",
    "ragged-all-to-all",
    "reduce-scatter",
    "collective-permute",
    "collective-broadcast",
)
_OPS = set(COLLECTIVE_OPS) | {op + "-start" for op in COLLECTIVE_OPS}

BYTES = {
    "pred": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")


@dataclass(frozen=True)
class Collective:
    op: str  # e.g. "all-gather" ("-start" stripped)
    name: str
    operands: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) of each array operand
    count: int = 1  # runs per execution of the program (loop trips)

    @property
    def bytes(self) -> int:
        """Operand bytes of one run."""
        return sum(BYTES.get(dt, 4) * math.prod(shape) for dt, shape in self.operands)

    @property
    def step_bytes(self) -> int:
        """Operand bytes over all runs per execution of the program."""
        return self.count * self.bytes


def shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, shape)`` of every array in an HLO type (``f32[2,3]``, a tuple of them ...)."""
    return [
        (dt, tuple(int(d) for d in dims.split(",") if d))
        for dt, dims in _SHAPE.findall(type_text)
        if dt in BYTES
    ]


def split_instruction(line: str):
    """``name = TYPE op(args), attrs`` -> (name, type_text, op, args_text) or None."""
    m = _HEAD.match(line)
    if not m:
        return None
    rest = line[m.end() :]
    depth, i = 0, 0
    while i < len(rest):  # the type: a balanced (...) tuple or one token
        c = rest[i]
        depth += c in "([{"
        depth -= c in ")]}"
        if c == " " and depth == 0:
            break
        i += 1
    type_text, rest = rest[:i], rest[i:].lstrip()
    op_match = re.match(r"([a-z][\w\-]*)\(", rest)
    if not op_match:
        return None
    args, depth = [], 1
    for c in rest[op_match.end() :]:
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
            break
        args.append(c)
    return m.group(1), type_text, op_match.group(1), "".join(args)


def split_args(args: str) -> list[str]:
    """An instruction's argument text split at its top-level commas."""
    out, depth, cur = [], 0, []
    for c in args:
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(
    r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_CONSTANT = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*s32\[\][^ ]*\s+constant\((\d+)\)")
_LT_ROOT = re.compile(r"ROOT\s.*compare\(%?([\w.\-]+),\s*%?([\w.\-]+)\),\s*direction=LT")


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """``({computation: its instruction lines}, entry name)``, in definition order."""
    comps: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("(")[0]:
            current = header.group(2)
            comps[current] = []
            entry = current if header.group(1) else entry
        elif current is not None and "=" in line:
            comps[current].append(line)
    return comps, entry


def _trip_count(while_line: str, comps: dict[str, list[str]]) -> int:
    """A while loop's trips: XLA's ``known_trip_count`` (CPU), else (the TPU compiler prints
    none) read from a condition ``i < N`` on a constant N: JAX's loops count 0, 1, ..., N-1.
    1 when neither is found."""
    known = _TRIPS.search(while_line)
    if known:
        return int(known.group(1))
    cond = _CONDITION.search(while_line)
    lines = comps.get(cond.group(1), []) if cond else []
    constants = dict(m.groups() for m in map(_CONSTANT.match, lines) if m)
    for line in lines:
        lt = _LT_ROOT.search(line)
        if lt and lt.group(2) in constants:
            return int(constants[lt.group(2)])
    return 1


def execution_counts(hlo_text: str) -> dict[str, int]:
    """``{computation: runs per execution of the module}``: the entry runs once, a while
    body :func:`_trip_count` times per run of its caller, other callees once per call site.
    HLO text defines every computation before its callers, so one pass from the end works."""
    comps, entry = computations(hlo_text)
    if entry is None:
        return dict.fromkeys(comps, 1)
    counts = dict.fromkeys(comps, 0)
    counts[entry] = 1
    for comp in reversed(list(comps)):
        for line in comps[comp]:
            n = _trip_count(line, comps) if " while(" in line else 1
            callees = [(c, n) for c in _CALLED.findall(line)]
            for group in _BRANCHES.findall(line):
                callees += [(c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip()]
            for callee, trips in callees:
                if callee in counts:
                    counts[callee] += counts[comp] * trips
    return counts


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective in an HLO module's text, with its operands' (dtype, shape) and how
    many times it runs per execution (:func:`execution_counts`)."""
    counts = execution_counts(hlo_text)
    where = {}  # instruction name -> its computation
    for comp, comp_lines in computations(hlo_text)[0].items():
        for line in comp_lines:
            head = _HEAD.match(line)
            if head:
                where[head.group(1)] = comp
    parsed = [p for p in map(split_instruction, hlo_text.splitlines()) if p]
    types = {name: type_text for name, type_text, _, _ in parsed}
    found = []
    for name, _, op, args in parsed:
        if op not in _OPS:
            continue
        operands = []
        for arg in split_args(args):
            arrays = shapes(arg)
            if not arrays:  # operand printed by name only
                ref = arg.split()[-1].lstrip("%") if arg.split() else ""
                arrays = shapes(types.get(ref, ""))
            operands += arrays
        count = max(counts.get(where.get(name, ""), 1), 1)
        found.append(Collective(op.removesuffix("-start"), name, tuple(operands), count))
    return found


def total_bytes(colls: list[Collective]) -> int:
    return sum(c.bytes for c in colls)


def summary(colls: list[Collective]) -> str:
    """One line per collective, for assertion messages."""
    return "\n".join(f"{c.op} {c.name}: {list(c.operands)} ({c.bytes} B)" for c in colls)
