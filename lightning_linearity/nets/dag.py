"""DAG connectivity: layering an edge list by longest path (004 Def. 2.1, 2.5) and random edge masks.

Every network of the package is the layered form of docs/math.md section 1: layer l reads
``c_l = concat(h_{l-1}, ..., h_1, x)`` through a 0/1 mask. This module turns either an explicit edge list
or an i.i.d. edge-dropping rule into those masks.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence, Sized
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_linearity._text import short_repr

# Tags that separate the random streams derived from one user seed (see `derived_generator`).
MASK_STREAM = 0x6D61736B  # "mask"
WEIGHT_STREAM = 0x77656967  # "weig"


def derived_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one named random stream of ``seed``.

    The state is hashed from ``(seed, stream)`` with numpy's ``SeedSequence``, so the mask stream and the
    weight stream of the same seed are statistically independent of each other and of
    ``torch.manual_seed(seed)``: a mask correlated with the weights would bias every NTK statistic.
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, stream])
    value = int(state.generate_state(1, dtype=np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator().manual_seed(value)


def dense_source_sizes(in_features: int, hidden_widths: Sequence[int], layer: int) -> list[int]:
    """Sizes of the blocks of ``c_l = concat(h_{l-1}, ..., h_1, x)`` for layer ``l`` (1-based)."""
    sizes = [in_features, *hidden_widths]
    return [sizes[j] for j in range(layer - 1, -1, -1)]


def random_dense_masks(
    in_features: int,
    hidden_widths: Sequence[int],
    out_features: int,
    drop_prob: float,
    generator: torch.Generator,
) -> list[Tensor]:
    """DenseNet connectivity with every edge kept i.i.d. with probability ``1 - drop_prob``.

    A row (neuron) left with no edge gets exactly one edge back, chosen uniformly at random from its
    candidate sources, so every non-input neuron has in-degree >= 1 (docs/math.md section 1). The uniforms are
    drawn in float32 on the CPU from the CPU ``generator`` whatever torch's default dtype and device, so a
    seed names one mask (float32 and float64 uniforms of one generator state differ).
    """
    widths = [*hidden_widths, out_features]
    masks = []
    for layer, rows in enumerate(widths, start=1):
        cols = sum(dense_source_sizes(in_features, hidden_widths, layer))
        uniform = torch.rand(rows, cols, generator=generator, dtype=torch.float32, device="cpu")
        keep = (uniform >= drop_prob).to(torch.get_default_dtype())
        empty = torch.nonzero(keep.sum(dim=1) == 0).flatten()
        if len(empty):
            keep[empty, torch.randint(cols, (len(empty),), generator=generator, device="cpu")] = 1.0
        masks.append(keep)
    return masks


@dataclass(frozen=True)
class DAGLayout:
    """An edge list organised into layers.

    Attributes:
        inputs: input vertices (in-degree 0), in the order of the columns of ``x``.
        outputs: output vertices (out-degree 0), in the order of the columns of ``f``.
        hidden_layers: the vertices of hidden layers 1..L, each layer in a fixed order.
        distance: p(v), the longest path length from any input to v (004 Def. 2.1); 0 for inputs.
        masks: for layers 1..L+1, the 0/1 mask over ``concat(h_{l-1}, ..., h_1, x)``.

    All outputs are placed in the output layer L+1 (004 Section 2.2 makes the same convention); an
    output with a shorter longest path computes exactly the same function there, and ``distance`` keeps
    its own p(v) for the width (004 Def. 2.7).
    """

    inputs: tuple[Hashable, ...]
    outputs: tuple[Hashable, ...]
    hidden_layers: tuple[tuple[Hashable, ...], ...]
    distance: dict[Hashable, int]
    masks: tuple[Tensor, ...]

    @property
    def hidden_widths(self) -> list[int]:
        return [len(layer) for layer in self.hidden_layers]


def _ordered(vertices: Iterable[Hashable], first_seen: dict[Hashable, int]) -> list[Hashable]:
    vertices = list(vertices)
    try:
        return sorted(vertices)
    except TypeError:
        return sorted(vertices, key=first_seen.__getitem__)


def _find_cycle(
    predecessors: dict[Hashable, list[Hashable]], remaining: set[Hashable], first_seen: dict[Hashable, int]
) -> list[Hashable]:
    """A cycle among ``remaining`` (vertices Kahn's algorithm could not order), in edge direction.

    Every such vertex kept a non-zero in-degree, so it has a predecessor in ``remaining``: walking
    backwards never stops and must revisit a vertex (walking forwards could end at a vertex that is only
    downstream of a cycle). The walk starts at the first-listed such vertex, so the report is reproducible.
    """
    path, position = [], {}
    vertex = next(w for w in first_seen if w in remaining)
    while vertex not in position:
        position[vertex] = len(path)
        path.append(vertex)
        vertex = next(p for p in predecessors[vertex] if p in remaining)
    cycle = [*path[position[vertex] :], vertex]
    return cycle[::-1]


def layer_edges(
    edges: Iterable[Sequence[Hashable]],
    inputs: Sequence[Hashable] | None = None,
    outputs: Sequence[Hashable] | None = None,
) -> DAGLayout:
    """Organise a DAG given as ``(u, v)`` edge pairs into layers by longest path from the inputs.

    Args:
        edges: directed edges ``u -> v``; vertices are any hashable labels.
        inputs: the input vertices in ``x``-column order; default: every vertex with in-degree 0, sorted.
        outputs: the output vertices in ``f``-column order; default: every vertex with out-degree 0, sorted.

    Raises:
        ValueError: on a malformed or duplicate edge, a cycle, a vertex with no path to an output, a vertex
            not reachable from an input, or a graph with no hidden vertex.
    """
    edge_list: list[tuple[Hashable, Hashable]] = []
    seen_edges: set[tuple[Hashable, Hashable]] = set()
    first_seen: dict[Hashable, int] = {}
    if isinstance(edges, str | bytes) or not isinstance(edges, Iterable):
        raise ValueError(f"edges must be a list of (u, v) pairs, got {short_repr(edges)}")
    for edge in edges:
        if isinstance(edge, str | bytes) or not isinstance(edge, Sized) or len(edge) != 2:
            raise ValueError(f"each edge must be a pair (u, v); got {short_repr(edge)}")
        u, v = edge
        for w in (u, v):
            _check_vertex(w, f"edge {edge!r}")
        if u == v:
            raise ValueError(f"edge {(u, v)!r} is a self-loop; a feedforward network's graph must be acyclic")
        if (u, v) in seen_edges:
            raise ValueError(f"duplicate edge {(u, v)!r}; list each edge once")
        seen_edges.add((u, v))
        edge_list.append((u, v))
        for w in (u, v):
            first_seen.setdefault(w, len(first_seen))
    if not edge_list:
        raise ValueError("the edge list is empty; give at least one (u, v) pair")

    predecessors: dict[Hashable, list[Hashable]] = {w: [] for w in first_seen}
    successors: dict[Hashable, list[Hashable]] = {w: [] for w in first_seen}
    for u, v in edge_list:
        predecessors[v].append(u)
        successors[u].append(v)

    # Kahn's algorithm: a topological order, or a cycle.
    indegree = {w: len(p) for w, p in predecessors.items()}
    order = [w for w in first_seen if indegree[w] == 0]
    for w in order:  # `order` grows while we iterate
        for s in successors[w]:
            indegree[s] -= 1
            if indegree[s] == 0:
                order.append(s)
    if len(order) < len(first_seen):
        cycle = _find_cycle(predecessors, set(first_seen) - set(order), first_seen)
        raise ValueError(f"the graph has a cycle {' -> '.join(map(repr, cycle))}; it must be acyclic")

    sources = [w for w in first_seen if not predecessors[w]]
    sinks = [w for w in first_seen if not successors[w]]
    inputs = _check_terminals("input", inputs, sources, first_seen, "incoming")
    outputs = _check_terminals("output", outputs, sinks, first_seen, "outgoing")
    for w in sources:
        if w not in inputs:
            raise ValueError(
                f"vertex {w!r} has no incoming edge but is not an input, so it is not reachable from an "
                f"input; add it to `inputs` or give it an incoming edge"
            )
    for w in sinks:
        if w not in outputs:
            raise ValueError(
                f"vertex {w!r} has no path to an output; add it to `outputs` or connect it onward"
            )

    distance: dict[Hashable, int] = {}
    for w in order:
        distance[w] = 1 + max((distance[p] for p in predecessors[w]), default=-1)
    output_set = set(outputs)
    depth = max(distance[w] for w in outputs)  # = L + 1
    hidden_layers = tuple(
        tuple(_ordered((w for w in first_seen if distance[w] == l and w not in output_set), first_seen))
        for l in range(1, depth)
    )
    if not hidden_layers:
        raise ValueError("the graph has no hidden vertex: every output reads the inputs directly")

    # Column position of every vertex inside c_l = concat(h_{l-1}, ..., h_1, x).
    blocks = [tuple(inputs), *hidden_layers]
    masks = []
    for layer, rows in enumerate([*hidden_layers, tuple(outputs)], start=1):
        columns: dict[Hashable, int] = {}
        for block in reversed(blocks[:layer]):
            for w in block:
                columns[w] = len(columns)
        mask = torch.zeros(len(rows), len(columns))
        for r, w in enumerate(rows):
            for p in predecessors[w]:
                mask[r, columns[p]] = 1.0
        masks.append(mask)
    return DAGLayout(tuple(inputs), tuple(outputs), hidden_layers, distance, tuple(masks))


def _check_vertex(vertex: object, where: str) -> None:
    """A vertex label must be hashable, not ``None`` and not NaN (NaN != NaN: it could never be found)."""
    if vertex is None or (isinstance(vertex, float) and math.isnan(vertex)):
        raise ValueError(f"{where}: vertex {vertex!r} is not a usable label; use strings or integers")
    try:
        hash(vertex)
    except TypeError:
        raise ValueError(
            f"{where}: vertex {vertex!r} is not hashable; use strings, integers or tuples"
        ) from None


def _check_terminals(
    kind: str,
    given: Sequence[Hashable] | None,
    candidates: list[Hashable],
    first_seen: dict[Hashable, int],
    direction: str,
) -> list[Hashable]:
    if given is None:
        return _ordered(candidates, first_seen)
    if isinstance(given, str | bytes) or not isinstance(given, Iterable):
        raise ValueError(
            f"`{kind}s` must be a list of vertices, got {short_repr(given)}; e.g. write [{given!r}]"
        )
    given = list(given)
    for w in given:
        _check_vertex(w, f"`{kind}s`")
    if len(set(given)) != len(given):
        raise ValueError(f"`{kind}s` lists a vertex twice: {given!r}")
    for w in given:
        if w not in first_seen:
            raise ValueError(f"{kind} vertex {w!r} does not appear in any edge")
        if w not in candidates:
            raise ValueError(f"{kind} vertex {w!r} has {direction} edges; an {kind} must have none")
    return given
