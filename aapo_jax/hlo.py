"""Collective traffic and on-chip staging of a compiled XLA module, read from its HLO text
(`compiled.as_text()`)."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
# Computation headers start at column 0 ("ENTRY %main.3 (p: f32[8]) -> f32[8] {");
# instructions are indented.
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*)?\{\s*$")
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([\d,]*)\]")
_CALLEE = re.compile(
    r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_CALLEE_LIST = re.compile(r"\b(branch_computations|called_computations|calls)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'known_trip_count"?\s*:\s*\{\s*"?n"?\s*:\s*"?(\d+)')
_OPERAND = re.compile(r"%([\w.\-]+)")
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_CHAIN = re.compile(r'\bchain_id="?(\d+)')


@dataclasses.dataclass(frozen=True)
class _Inst:
    shape: str
    opcode: str
    rest: str  # operands and attributes


@dataclasses.dataclass
class _Computation:
    insts: dict[str, _Inst] = dataclasses.field(default_factory=dict)
    root: str | None = None


def shape_bytes(shape_text: str) -> int:
    """Bytes of an HLO shape (an array or a tuple of arrays), e.g. `(f32[8,128]{1,0}, s32[])`."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        bits = _dtype_bits(dtype)
        if bits is None:
            continue
        count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += count * bits // 8
    return total


# An array in on-chip memory: memory space 1 in its layout (XLA:TPU's VMEM), e.g.
# bf16[12,4,128,3072]{3,2,1,0:T(8,128)(2,1)S(1)}.
_ON_CHIP = re.compile(r"\b[a-z]+[0-9a-z]*\[[\d,]*\]\{[^}]*S\(1\)\}")


def on_chip_copies(hlo_text: str) -> tuple[int, int]:
    """(`staging_bytes`, `eviction_bytes`) of a compiled module from one parse: the bytes
    `copy-start`s in every computation copy into on-chip memory and out of it, each once
    (a copy-start's shape is (destination, source, context))."""
    computations, _ = _parse_hlo(hlo_text)
    into = out_of = 0
    for computation in computations.values():
        for inst in computation.insts.values():
            if inst.opcode != "copy-start":
                continue
            arrays = list(_ARRAY.finditer(inst.shape))
            on_chip = [m.start() for m in _ON_CHIP.finditer(inst.shape)]
            if len(arrays) < 2:
                continue
            destination, source = arrays[0], arrays[1]
            if destination.start() in on_chip:
                into += shape_bytes(destination.group(0))
            elif source.start() in on_chip:
                out_of += shape_bytes(source.group(0))
    return into, out_of


def staging_bytes(hlo_text: str) -> int:
    """Bytes a compiled module copies into on-chip memory (memory space 1: TPU VMEM) by
    asynchronous copies (`copy-start` whose destination is there), each counted once.

    XLA:TPU prefetches weights and cache slices into VMEM before the ops that read them;
    its cost analysis counts such a copy as bytes read and written on top of the reads
    that follow, although the HBM traffic is the one read. This is the size of those
    copies, to read `bytes_accessed` beside. 0 where the backend stages nothing (CPU).
    """
    return on_chip_copies(hlo_text)[0]


def eviction_bytes(hlo_text: str) -> int:
    """Bytes a compiled module copies out of on-chip memory back to HBM (`copy-start` whose
    source is in memory space 1), each counted once: e.g. a layer's cache that XLA:TPU
    prefetched, wrote a slot into on chip and writes back whole. 0 on CPU."""
    return on_chip_copies(hlo_text)[1]


def _dtype_bits(name: str) -> int | None:
    """Bits per element of an HLO element type (pred, s32, bf16, f8e4m3fn, c64...)."""
    if name == "pred":
        return 8
    found = re.fullmatch(r"[a-z]+?(\d+)[a-z0-9]*", name)
    return None if found is None else int(found.group(1))


def _parse_hlo(hlo_text: str) -> tuple[dict[str, _Computation], str | None]:
    computations: dict[str, _Computation] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith("HloModule"):
            current = computations.setdefault(header.group(2), _Computation())
            entry = header.group(2) if header.group(1) else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        inst = _INSTRUCTION.match(line)
        if inst and current is not None:
            root, name, shape, opcode, rest = inst.groups()
            current.insts[name] = _Inst(shape, opcode, rest)
            current.root = name if root else current.root
    if entry is None and computations:
        entry = list(computations)[-1]
    return computations, entry


def _operands(rest: str) -> list[str]:
    return _OPERAND.findall(rest.split(")", 1)[0])


def _trip_count(inst: _Inst, caller: _Computation, computations) -> int | None:
    """A while loop's trip count: `known_trip_count` (XLA:CPU/GPU state it), else read off a
    counter condition `i < N` (XLA:TPU drops the annotation) with i's start from the init
    tuple (0 when it is not a constant). None for any other condition (e.g. stop at EOS).
    """
    found = _TRIP_COUNT.search(inst.rest.replace("\\", ""))
    if found:
        return int(found.group(1))
    name = re.search(r"condition=%?([\w.\-]+)", inst.rest)
    cond = computations.get(name.group(1)) if name else None
    if cond is None or cond.root is None:
        return None
    root = cond.insts[cond.root]
    direction = re.search(r"direction=(\w+)", root.rest)
    operands = _operands(root.rest)
    if root.opcode != "compare" or direction is None or len(operands) != 2:
        return None
    direction = direction.group(1)
    if direction in ("GT", "GE"):
        operands.reverse()
        direction = "LT" if direction == "GT" else "LE"
    if direction not in ("LT", "LE"):
        return None
    counter, limit = (cond.insts.get(o) for o in operands)
    if counter is None or limit is None or counter.opcode != "get-tuple-element":
        return None
    if limit.opcode != "constant":
        return None
    index = re.search(r"index=(\d+)", counter.rest)
    start = 0
    init = caller.insts.get(next(iter(_operands(inst.rest)), ""))
    if index and init is not None and init.opcode == "tuple":
        elements = _operands(init.rest)
        first = caller.insts.get(elements[int(index.group(1))]) if elements else None
        if first is not None and first.opcode == "constant":
            start = int(first.rest.split(")", 1)[0])
    stop = int(limit.rest.split(")", 1)[0]) + (direction == "LE")
    return max(stop - start, 0)


def collective_bytes(hlo_text: str) -> dict[str, Any]:
    """Bytes moved per step by each kind of collective in a compiled module's HLO text.

    Every all-gather / all-reduce / reduce-scatter / all-to-all / collective-permute counts
    its result shape's bytes (per device: HLO shapes are per-device after SPMD
    partitioning). An async pair counts once, at its `-done` instruction (its result is the
    collective's), and so does an async collective that XLA:TPU splits into a chain of
    fusions (each holds a copy with the same channel and `chain_id`). Instructions inside
    a `while` body count times the loop's trip count (`known_trip_count`, or a counter
    condition `i < N`; nested loops multiply); a loop whose trip count the HLO does not
    give (e.g. a decode loop that stops at EOS) counts once, and is listed with its
    collectives per iteration. A `conditional` counts its heaviest branch only (one branch
    runs; e.g. the update's length buckets).

    Args:
      hlo_text: `compiled.as_text()`.

    Returns:
      {"bytes": {kind: bytes}, "count": {kind: instructions}, "unknown_trip_count_loops":
      [{"loop": name, "bytes_per_iteration": {kind: bytes}}]}.
    """
    computations, entry = _parse_hlo(hlo_text)
    # computation -> [(callee, multiplier, the while's name when its trip count is unknown)]
    calls: dict[str, list[tuple[str, int, str | None]]] = {name: [] for name in computations}
    # computation -> the branch lists of its conditionals: one branch runs per execution.
    branches: dict[str, list[list[str]]] = {name: [] for name in computations}
    for name, comp in computations.items():
        for inst_name, inst in comp.insts.items():
            trip, unknown = 1, None
            if inst.opcode == "while":
                trip = _trip_count(inst, comp, computations)
                trip, unknown = (1, inst_name) if trip is None else (trip, None)
            callees = [c for _, c in _CALLEE.findall(inst.rest)]
            for _, group in _CALLEE_LIST.findall(inst.rest):
                callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            callees = [c for c in callees if c in computations]
            if inst.opcode == "conditional":
                branches[name].append(callees)
            else:
                calls[name] += [(c, trip, unknown) for c in callees]

    def local(name: str) -> dict[tuple, tuple[str, int]]:
        return {
            _collective_key(name, inst_name, inst): (kind, shape_bytes(inst.shape))
            for inst_name, inst in computations[name].insts.items()
            if (kind := _collective_kind(inst.opcode)) is not None
        }

    @functools.cache
    def subtree(name: str) -> tuple[tuple[tuple, tuple[str, int]], ...]:
        total = local(name)
        # A conditional moves what its heaviest branch moves (an upper bound per execution).
        chosen = [
            max(group, key=lambda b: sum(v for _, (_, v) in subtree(b)))
            for group in branches[name]
            if group
        ]
        for callee, trip, _ in [*calls[name], *((b, 1, None) for b in chosen)]:
            for key, (kind, value) in subtree(callee):
                if key in total and key[0] == "chain":  # one async collective's pieces
                    total[key] = (kind, max(total[key][1], trip * value))
                elif key in total:  # the same computation called again
                    total[key] = (kind, total[key][1] + trip * value)
                else:
                    total[key] = (kind, trip * value)
        return tuple(total.items())

    def by_kind(entries) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind, value in (v for _, v in entries):
            out[kind] = out.get(kind, 0) + value
        return out

    counted_chains: set[tuple] = set()
    counts: dict[str, int] = {}
    per_loop: dict[str, dict[str, int]] = {}  # body + condition of each unknown loop
    for name, comp in computations.items():
        for inst_name, inst in comp.insts.items():
            kind = _collective_kind(inst.opcode)
            if kind is None:
                continue
            key = _collective_key(name, inst_name, inst)
            if key not in counted_chains:
                counts[kind] = counts.get(kind, 0) + 1
            if key[0] == "chain":
                counted_chains.add(key)
        for callee, _, loop in calls[name]:
            if loop is not None:
                into = per_loop.setdefault(loop, {})
                for kind, value in by_kind(subtree(callee)).items():
                    into[kind] = into.get(kind, 0) + value
    result = by_kind(subtree(entry)) if entry is not None else {}
    return {
        "bytes": {kind: result.get(kind, 0) for kind in COLLECTIVES},
        "count": {kind: counts.get(kind, 0) for kind in COLLECTIVES},
        "unknown_trip_count_loops": [
            {"loop": loop, "bytes_per_iteration": per_iter} for loop, per_iter in per_loop.items()
        ],
    }


def _collective_key(computation: str, name: str, inst: _Inst) -> tuple:
    """What identifies one collective: XLA:TPU splits an async collective into a chain of
    fusions (start, continuations, done), each holding a copy of the collective with the
    same channel and `chain_id`; those copies are one transfer. Any other instruction is
    its own."""
    chain = _CHAIN.search(inst.rest)
    channel = _CHANNEL.search(inst.rest)
    if chain and channel:
        return ("chain", channel.group(1), chain.group(1))
    return ("inst", computation, name)


def _collective_kind(opcode: str) -> str | None:
    if opcode.endswith("-start"):
        return None  # counted at its -done
    base = opcode.removesuffix("-done")
    return base if base in COLLECTIVES else None
