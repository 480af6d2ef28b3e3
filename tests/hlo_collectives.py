"""Find collectives that XLA:CPU may run concurrently with a collective held in control flow.

XLA:CPU executes the independent instructions of one device's program concurrently on a shared worker pool and
orders the collectives of one computation among themselves, but not a collective inside a conditional or while
body with one outside it. With 8 host devices on a 2-core machine, device 0 then waited in two collectives at
once while device 7 found no free worker to reach the first: a fatal rendezvous timeout. A compiled step is safe
when every conditional/while that holds a collective is data-ordered (ancestor or descendant) with every other
collective of its computation.
"""
from __future__ import annotations

import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "all-gather-start", "all-reduce-start", "collective-permute-start")
CONTROL_FLOW = ("conditional", "while", "call")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"\s([a-z][\w\-]*)\(")
_CALLEES = re.compile(r"(?:branch_computations|true_computation|false_computation|body|condition|calls|to_apply)="
                      r"(\{[^}]*\}|%?[\w.\-]+)")
_PREDECESSORS = re.compile(r"control-predecessors=\{([^}]*)\}")


def _operands(rest: str, opcode_end: int) -> list[str]:
    depth, end = 1, opcode_end
    while depth and end < len(rest):
        depth += {"(": 1, ")": -1}.get(rest[end], 0)
        end += 1
    names = re.findall(r"%([\w.\-]+)", rest[opcode_end:end])
    for group in _PREDECESSORS.findall(rest):
        names += re.findall(r"%?([\w.\-]+)", group)
    return names


def parse(hlo_text: str) -> dict[str, dict[str, tuple[str, list[str], list[str]]]]:
    """computation -> instruction -> (opcode, operands and control predecessors, called computations)."""
    computations: dict[str, dict[str, tuple[str, list[str], list[str]]]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(1), {})
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction is None or current is None:
            continue
        name, rest = instruction.groups()
        opcode = _OPCODE.search(rest)
        if opcode is None:
            continue
        callees = [c for group in _CALLEES.findall(rest) for c in re.findall(r"%?([\w.\-]+)", group)]
        current[name] = (opcode.group(1), _operands(rest, opcode.end()), callees)
    return computations


def racing_collectives(hlo_text: str) -> list[tuple[str, str, str]]:
    """(computation, a, b) for every pair of collective-holding instructions with no data order between them,
    at least one of them a conditional/while/call that holds a collective."""
    computations = parse(hlo_text)
    holds: dict[str, bool] = {}

    def holds_collective(name: str) -> bool:
        if name not in holds:
            holds[name] = False  # recursion guard
            holds[name] = any(op in COLLECTIVES or any(holds_collective(c) for c in callees)
                              for op, _, callees in computations.get(name, {}).values())
        return holds[name]

    found = []
    for computation, instructions in computations.items():
        units = [n for n, (op, _, callees) in instructions.items()
                 if op in COLLECTIVES or (op in CONTROL_FLOW and any(holds_collective(c) for c in callees))]
        ancestors = {n: _ancestors(instructions, n) for n in units}
        for i, a in enumerate(units):
            for b in units[i + 1:]:
                if CONTROL_FLOW.count(instructions[a][0]) + CONTROL_FLOW.count(instructions[b][0]) == 0:
                    continue
                if a not in ancestors[b] and b not in ancestors[a]:
                    found.append((computation, a, b))
    return found


def _ancestors(instructions: dict[str, tuple[str, list[str], list[str]]], name: str) -> set[str]:
    seen, stack = set(), list(instructions[name][1])
    while stack:
        x = stack.pop()
        if x in instructions and x not in seen:
            seen.add(x)
            stack.extend(instructions[x][1])
    return seen
