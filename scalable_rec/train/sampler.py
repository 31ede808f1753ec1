"""A heterogeneous link-neighbour sampler in plain torch, behind PyG's ``BaseSampler``.

It samples where its CSC lives (a CUDA device or the CPU), with no Python loop per node:
per hop and edge type it gathers every frontier node's CSC range and draws up to the
hop's fanout of them uniformly without replacement. ``LinkLoader`` takes it as its
``link_sampler`` and turns its ``HeteroSamplerOutput`` into the ``HeteroData`` batch the
model takes, over ``device_stores`` (the graph's CSC and node features on that device).

How a node's neighbours are drawn (``k`` the fanout, ``d`` the node's degree;
``scalable_rec.train.draws``):

- ``d <= DRAW_FROM * k``: every candidate gets a random 32-bit key and one sort by
  (node, key) orders each node's candidates at random; the first ``k`` are kept (all of
  them when ``d <= k``). Exactly uniform up to key ties (probability ~ d² / 2³³).
- ``d > DRAW_FROM * k`` (hubs, whose whole range would be costly to sort): ``2k``
  positions are drawn with replacement, and the first ``k`` distinct ones in draw order
  are kept, which is a uniform ``k``-subset. A hub that does not get ``k`` distinct
  allowed draws (rare) goes through the sort instead. Cost O(k) per hub, not O(d).

Each batch's target edges, and their reverse edges, are never candidates
(``exclude_targets``): a node's fanout is filled from its other neighbours. A batch's
draws are a function of the sampler's seed and the batch's input ids, so they repeat
across runs, resumes and worker counts.

Host syncs (on CUDA the host waits for the device wherever a size is read): a hop reads
sizes only where a shape needs them, each read one ``tolist`` of every size known by
then, and compacts with ``nonzero_static`` given that size (a boolean index, ``nonzero``,
``unique`` or ``repeat_interleave`` without ``output_size`` would each read one). Three
reads per hop at most, with hubs in both edge types (``_hop``, ``_fresh``), one more per
batch (the first hop's sizes), and one per edge type whose hub draws fall short while
targets are excluded (rare). A batch's own bookkeeping
(its endpoints' ``unique``, its target keys, the ids that seed it) runs on the loader's
CPU tensors, which are then copied over without a stream sync.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.data import HeteroData
from torch_geometric.sampler import (
    BaseSampler,
    EdgeSamplerInput,
    HeteroSamplerOutput,
    NegativeSampling,
    NodeSamplerInput,
)
from torch_geometric.typing import EdgeType, NodeType

from scalable_rec.graph.store import MappedFeatureStore, MappedGraphStore
from scalable_rec.train.draws import EdgeDraws, first_sizes, read_sizes, where_true

_MIX = 0x9E3779B97F4A7C15 - (1 << 64)  # odd 64-bit constant (as int64) for the batch seed


def device_stores(
    data: HeteroData | tuple, device: torch.device
) -> tuple[MappedFeatureStore, MappedGraphStore, dict[EdgeType, Tensor | None]]:
    """The graph of ``data`` as a ``(feature_store, graph_store)`` pair on ``device``, CSC
    per edge type, and each edge type's permutation from CSC position to edge id.

    ``data`` is a ``HeteroData`` (its COO ``edge_index`` is sorted into a CSC by
    destination, stably; the permutation maps a sampled position back to its column of
    ``edge_index``) or the mapped index's ``(feature_store, graph_store)`` (its CSC is
    used as it is, and positions are the ids, as with PyG's sampler over it). On the CPU
    the mapped tensors are not copied. Node types without features get a zero-width ``x``.
    """
    features, graph = MappedFeatureStore(), MappedGraphStore()
    perm: dict[EdgeType, Tensor | None] = {}
    if isinstance(data, HeteroData):
        for node_type in data.node_types:
            store = data[node_type]
            x = store.x if "x" in store else torch.empty(store.num_nodes, 0)
            features.put_tensor(x.to(device), group_name=node_type, attr_name="x", index=None)
        for edge_type in data.edge_types:
            src, dst = data[edge_type].edge_index.to(device)
            num_src, num_dst = data[edge_type[0]].num_nodes, data[edge_type[2]].num_nodes
            order = torch.argsort(dst, stable=True)
            colptr = torch.zeros(num_dst + 1, dtype=torch.long, device=device)
            colptr[1:] = torch.bincount(dst, minlength=num_dst).cumsum(0)
            graph.put_edge_index(
                (src[order], colptr), edge_type=edge_type, layout="csc", size=(num_src, num_dst), is_sorted=True
            )
            perm[edge_type] = order
        return features, graph, perm
    feature_store, graph_store = data
    for attr in feature_store.get_all_tensor_attrs():
        features.put_tensor(
            feature_store.get_tensor(attr.group_name, attr.attr_name, index=None).to(device),
            group_name=attr.group_name,
            attr_name=attr.attr_name,
            index=None,
        )
    for attr in graph_store.get_all_edge_attrs():
        if attr.layout.value != "csc":
            continue
        row, colptr = graph_store.get_edge_index(attr.edge_type, layout="csc")
        graph.put_edge_index(
            (row.to(device), colptr.to(device)), edge_type=attr.edge_type, layout="csc", size=attr.size, is_sorted=True
        )
        perm[attr.edge_type] = None
    return features, graph, perm


def sampler_bytes(data: HeteroData | tuple) -> int:
    """Bytes ``device_stores`` puts on a device for ``data``: CSC, permutations, node
    features, and the sampler's node-id maps (8 bytes per node)."""
    if isinstance(data, HeteroData):
        edges = sum(data[et].edge_index.size(1) for et in data.edge_types)
        nodes = {nt: data[nt].num_nodes for nt in data.node_types}
        x = sum(data[nt].x.nbytes for nt in data.node_types if "x" in data[nt])
        return 8 * (2 * edges + sum(nodes.values()) * 2 + len(data.edge_types)) + x
    feature_store, graph_store = data
    total = 0
    for attr in graph_store.get_all_edge_attrs():
        row, colptr = graph_store.get_edge_index(attr.edge_type, layout="csc")
        total += row.nbytes + colptr.nbytes + 8 * attr.size[0]
    for attr in feature_store.get_all_tensor_attrs():
        total += feature_store.get_tensor(attr.group_name, attr.attr_name, index=None).nbytes
    return total


class TorchNeighborSampler(BaseSampler):
    """Uniform neighbour sampling without replacement over the CSC of ``graph_store``, on
    the device that CSC is on (module docstring: how).

    Args:
        graph_store: CSC per edge type (``device_stores``).
        num_neighbors: Fanout per hop, one list for every edge type or one list per edge
            type (all of one length); ``-1`` takes every neighbour.
        seed: Seed of the draws; with the batch's input ids it seeds each batch.
        exclude_targets: Leave each batch's input edges, and their reverse edges, out of
            its subgraph.
        num_edges: Inputs with ``input_id >= num_edges`` (pads) exclude nothing.
            ``None``: every input excludes.
        edge_permutation: CSC position → edge id per edge type (``device_stores``).
    """

    def __init__(
        self,
        graph_store: MappedGraphStore,
        num_neighbors: list[int] | dict[EdgeType, list[int]],
        seed: int = 0,
        exclude_targets: bool = False,
        num_edges: int | None = None,
        edge_permutation: dict[EdgeType, Tensor | None] | None = None,
    ) -> None:
        attrs = [a for a in graph_store.get_all_edge_attrs() if a.layout.value == "csc"]
        if not attrs:
            raise ValueError("'graph_store' needs a CSC edge index per edge type (got none)")
        self.edge_types: list[EdgeType] = [a.edge_type for a in attrs]
        self.csc = {a.edge_type: graph_store.get_edge_index(a.edge_type, layout="csc") for a in attrs}
        self.num_nodes: dict[NodeType, int] = {}
        for a in attrs:
            self.num_nodes[a.edge_type[0]], self.num_nodes[a.edge_type[2]] = a.size
        if not isinstance(num_neighbors, dict):
            num_neighbors = {et: list(num_neighbors) for et in self.edge_types}
        problems = [
            f"'num_neighbors' has no fanout for edge type {et}" for et in self.edge_types if et not in num_neighbors
        ]
        hops = {len(v) for v in num_neighbors.values()}
        if len(hops) > 1:
            problems.append(f"'num_neighbors' needs as many hops for every edge type (got {sorted(hops)})")
        if any(k == 0 or k < -1 for v in num_neighbors.values() for k in v):
            problems.append(f"'num_neighbors' needs positive entries or -1 (got {num_neighbors})")
        if problems:
            raise ValueError("; ".join(problems))
        self.num_neighbors = {et: num_neighbors[et] for et in self.edge_types}
        self.num_hops = hops.pop()
        self.device = next(iter(self.csc.values()))[0].device
        self.seed = seed
        self.exclude_targets = exclude_targets
        self.num_edges = num_edges
        self._perm = edge_permutation
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # global id → local id of the batch being sampled (-1: not in it); reset after each batch
        self._local = {
            nt: torch.full((n,), -1, dtype=torch.long, device=self.device) for nt, n in self.num_nodes.items()
        }

    @property
    def edge_permutation(self) -> dict[EdgeType, Tensor | None] | None:
        return self._perm

    def sample_from_nodes(self, index: NodeSamplerInput, **kwargs) -> HeteroSamplerOutput:
        """The sampled neighbourhood of ``index.node`` (distinct seeds, kept in order: a
        batch's first nodes of the input type are its seeds, as with PyG's samplers)."""
        if index.time is not None or index.input_type is None:
            raise ValueError(
                "TorchNeighborSampler needs typed seed nodes without 'time' "
                f"(got input_type {index.input_type!r}, time {'set' if index.time is not None else None})"
            )
        # Checked where the seeds are (the loader's CPU tensors): no device read.
        if index.node.unique().numel() != index.node.numel():
            raise ValueError(f"TorchNeighborSampler needs distinct seed nodes (got {index.node.numel()} with repeats)")
        self._seed_batch(index.input_id)
        seeds = index.node.to(self.device, non_blocking=True)
        out = self._sample({index.input_type: seeds}, index.input_type, None)
        out.metadata = (index.input_id, None)
        return out

    def sample_from_edges(
        self, index: EdgeSamplerInput, neg_sampling: NegativeSampling | None = None
    ) -> HeteroSamplerOutput:
        """The union of the input edges' endpoints' sampled neighbourhoods (PyG's
        ``edge_sample`` without negatives or time: endpoints deduplicated per node type,
        ``edge_label_index`` into them)."""
        if neg_sampling is not None:
            raise ValueError(
                "TorchNeighborSampler draws no negatives (got 'neg_sampling'); "
                "the retrieval head uses in-batch negatives"
            )
        if index.time is not None:
            raise ValueError("TorchNeighborSampler does not sample in time (got 'time' on its input)")
        if index.input_type is None:
            raise ValueError("TorchNeighborSampler needs the input edges' type (got 'input_type' None)")
        self._seed_batch(index.input_id)
        src_type, _, dst_type = index.input_type
        # The batch's own bookkeeping (deduplicated endpoints, target keys) runs where the
        # loader made its input, the CPU: no device read; only the results are copied over.
        row, col = index.row, index.col
        if src_type != dst_type:
            src, inv_src = row.unique(return_inverse=True)
            dst, inv_dst = col.unique(return_inverse=True)
            seeds, label_index = {src_type: src, dst_type: dst}, torch.stack([inv_src, inv_dst])
        else:
            seed, inverse = torch.cat([row, col]).unique(return_inverse=True)
            seeds, label_index = {src_type: seed}, inverse.view(2, -1)
        targets = None
        if self.exclude_targets:
            real = (
                slice(None)
                if self.num_edges is None or index.input_id is None
                else (index.input_id.to(row.device) < self.num_edges)
            )
            targets = (row[real] * self.num_nodes[dst_type] + col[real]).unique().to(self.device, non_blocking=True)
        seeds = {nt: ids.to(self.device, non_blocking=True) for nt, ids in seeds.items()}
        out = self._sample(seeds, index.input_type, targets)
        out.metadata = (index.input_id, label_index.to(self.device, non_blocking=True), index.label, None)
        return out

    def _seed_batch(self, input_id: Tensor | None) -> None:
        """Seeds this batch's draws from (seed, input ids): a batch repeats whatever came
        before it (other batches, a resume, another worker). The ids are read on the host:
        from the loader they are CPU tensors, so this reads no device memory."""
        if input_id is None:
            return
        ids = input_id.to("cpu", torch.long)
        mixed = int(((ids + 1) * _MIX).sum()) ^ (self.seed * 0x2545F491 + ids.numel())
        self.generator.manual_seed(mixed & ((1 << 63) - 1))

    def _sample(
        self, seeds: dict[NodeType, Tensor], input_type: EdgeType, targets: Tensor | None
    ) -> HeteroSamplerOutput:
        node = {nt: seeds.get(nt, torch.empty(0, dtype=torch.long, device=self.device)) for nt in self.num_nodes}
        for nt, ids in node.items():
            self._local[nt][ids] = torch.arange(ids.numel(), device=self.device)
        frontier = dict(node)
        offset = {nt: 0 for nt in node}  # local id of each frontier's first node
        rows, cols, edges = ({et: [] for et in self.edge_types} for _ in range(3))
        sampled_nodes = {nt: [ids.numel()] for nt, ids in node.items()}
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        ahead = None  # the hop's first sizes, read with the hop before's new nodes
        try:
            for hop in range(self.num_hops):
                found = self._hop(hop, frontier, input_type, targets, ahead)
                src = {et: self.csc[et][0][pos] for et, (_, pos) in found.items()}
                dst = {et: which + offset[et[2]] for et, (which, _) in found.items()}
                candidates = {nt: [src[et] for et in found if et[0] == nt] for nt in node}
                fresh, ahead = self._fresh(candidates, hop + 1 if hop + 1 < self.num_hops else None)
                for nt, new in fresh.items():
                    offset[nt] = node[nt].numel()
                    node[nt] = torch.cat([node[nt], new])
                    self._local[nt][new] = torch.arange(offset[nt], node[nt].numel(), device=self.device)
                    frontier[nt] = new
                    sampled_nodes[nt].append(new.numel())
                for et in self.edge_types:  # one entry per hop and edge type
                    rows[et].append(self._local[et[0]][src[et]] if et in src else empty)
                    cols[et].append(dst.get(et, empty))
                    edges[et].append(found[et][1] if et in found else empty)
        finally:
            for nt, ids in node.items():
                self._local[nt][ids] = -1
        return HeteroSamplerOutput(
            node=node,
            row={et: torch.cat(rows[et]) for et in self.edge_types},
            col={et: torch.cat(cols[et]) for et in self.edge_types},
            edge={et: torch.cat(edges[et]) for et in self.edge_types},
            num_sampled_nodes=sampled_nodes,
            num_sampled_edges={et: [c.numel() for c in cols[et]] for et in self.edge_types},
        )

    def _fresh(
        self, candidates: dict[NodeType, list[Tensor]], next_hop: int | None
    ) -> tuple[dict[NodeType, Tensor], dict[EdgeType, list[int]] | None]:
        """Per node type, the sampled sources not yet in the batch, deduplicated and sorted:
        each type's candidates sorted (those already in the batch set past every id) and
        their first occurrences counted. Read with those counts: ``next_hop``'s first sizes
        per edge type (``first_sizes``, from the new nodes' degrees before they are
        compacted into the next frontier); ``None`` after the last hop."""
        ordered, first = {}, {}
        for nt, parts in candidates.items():
            cand = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=self.device)
            cand = torch.where(self._local[nt][cand] < 0, cand, self.num_nodes[nt]).sort().values
            new = cand < self.num_nodes[nt]
            new[1:] &= cand[1:] != cand[:-1]
            ordered[nt], first[nt] = cand, new
        values = [first[nt].sum() for nt in candidates]
        if next_hop is not None:
            for et in self.edge_types:
                nt, colptr = et[2], self.csc[et][1]
                at = ordered[nt].clamp(max=self.num_nodes[nt] - 1)
                deg = (colptr[at + 1] - colptr[at]).masked_fill(~first[nt], 0)
                values += first_sizes(deg, self.num_neighbors[et][next_hop])
        sizes = read_sizes(values)  # sync point: the hop's new nodes per type (and the next hop's first sizes)
        fresh = {nt: ordered[nt][where_true(first[nt], n)] for nt, n in zip(candidates, sizes)}
        if next_hop is None:
            return fresh, None
        rest = sizes[len(candidates) :]
        return fresh, {et: rest[3 * i : 3 * i + 3] for i, et in enumerate(self.edge_types)}

    def _hop(
        self,
        hop: int,
        frontier: dict[NodeType, Tensor],
        input_type: EdgeType,
        targets: Tensor | None,
        ahead: dict[EdgeType, list[int]] | None = None,
    ) -> dict[EdgeType, tuple[Tensor, Tensor]]:
        """Up to the hop's fanout of in-neighbours of every frontier node, per edge type with
        a frontier: ``{et: (which, pos)}``, the index into the frontier and the CSC position
        of each sampled edge.

        Draws come from the one generator in edge-type order (each type's hub draws, then
        its sort keys), and their sizes are read from the device only where a shape needs
        them, each read taking every size known by then: the hub and candidate counts of all
        types (``ahead``: read with the hop before's new nodes; read here at the first hop),
        then the filtered counts of all types with the first type's draw outcome, then each
        later type's draw outcome (only where it has hubs), and the hubs' ranges where draws
        fell short and targets are excluded (rare).
        """
        todo = []
        for et in self.edge_types:
            f = frontier[et[2]]
            if f.numel():
                allowed = self._allowed_fn(et, input_type, targets, f)
                k = self.num_neighbors[et][hop]
                todo.append(EdgeDraws(et, f, k, self.csc[et][1], self.generator, allowed))
        if not todo:
            return {}
        if ahead is None:  # the first hop (later ones were read with the new nodes)
            # sync point: hubs and non-hub candidates of every edge type, one read
            sizes = read_sizes([x for d in todo for x in first_sizes(d.deg, d.k)])
            ahead = {d.et: sizes[3 * i : 3 * i + 3] for i, d in enumerate(todo)}
        for d in todo:
            d.gather(*ahead[d.et])
        todo[0].draw()
        # sync point: allowed and kept candidates of every edge type, and the first type's missed hubs
        later = read_sizes([x for d in todo for x in d.filtered()] + todo[0].outcome())
        for d in todo:
            if d.allowed is not None:
                d.nonhub_allowed, d.nonhub_kept = later[:2]
                later = later[2:]
        found = {}
        for i, d in enumerate(todo):
            if i:
                d.draw()
                outcome = read_sizes(d.outcome())  # sync point: this type's missed hubs (only where it has hubs)
            else:
                outcome = later
            found[d.et] = d.finish(*outcome)
        return found

    def _allowed_fn(self, et: EdgeType, input_type: EdgeType, targets: Tensor | None, frontier: Tensor):
        """``(which, pos) → bool mask``: which candidate edges are not a batch target (or
        its reverse); ``None`` when every edge of ``et`` is allowed. ``targets`` is sorted
        (``unique``), so membership is a binary search (``isin`` would read sizes)."""
        if targets is None or targets.numel() == 0:
            return None
        if (et[0], et[2]) == (input_type[0], input_type[2]):
            key = lambda src, dst: src * self.num_nodes[input_type[2]] + dst  # noqa: E731
        elif (et[0], et[2]) == (input_type[2], input_type[0]):
            key = lambda src, dst: dst * self.num_nodes[input_type[2]] + src  # noqa: E731
        else:
            return None
        row, last = self.csc[et][0], targets.numel() - 1

        def allowed(which: Tensor, pos: Tensor) -> Tensor:
            keys = key(row[pos], frontier[which])
            return targets[torch.searchsorted(targets, keys).clamp_(max=last)] != keys

        return allowed
