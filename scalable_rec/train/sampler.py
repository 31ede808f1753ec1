"""A heterogeneous link-neighbour sampler in plain torch, behind PyG's ``BaseSampler``.

It samples where its CSC lives (a CUDA device or the CPU), with no Python loop per node:
per hop and edge type it gathers every frontier node's CSC range and draws up to the
hop's fanout of them uniformly without replacement. ``LinkLoader`` takes it as its
``link_sampler`` and turns its ``HeteroSamplerOutput`` into the ``HeteroData`` batch the
model takes, over ``device_stores`` (the graph's CSC and node features on that device).

How a node's neighbours are drawn (``k`` the fanout, ``d`` the node's degree):

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

DRAW_FROM = 4  # a node with more than DRAW_FROM × fanout neighbours is drawn from, not sorted
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
        seeds = index.node.to(self.device)
        if seeds.unique().numel() != seeds.numel():
            raise ValueError(f"TorchNeighborSampler needs distinct seed nodes (got {seeds.numel()} with repeats)")
        self._seed_batch(index.input_id)
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
        row, col = index.row.to(self.device), index.col.to(self.device)
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
                else (index.input_id.to(self.device) < self.num_edges)
            )
            targets = (row[real] * self.num_nodes[dst_type] + col[real]).unique()
        out = self._sample(seeds, index.input_type, targets)
        out.metadata = (index.input_id, label_index, index.label, None)
        return out

    def _seed_batch(self, input_id: Tensor | None) -> None:
        """Seeds this batch's draws from (seed, input ids): a batch repeats whatever came
        before it (other batches, a resume, another worker)."""
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
        try:
            for hop in range(self.num_hops):
                found = []
                for et in self.edge_types:
                    f = frontier[et[2]]
                    which, pos = (
                        self._draw(et, f, self.num_neighbors[et][hop], input_type, targets)
                        if f.numel()
                        else (empty, empty)
                    )
                    found.append((et, self.csc[et][0][pos], which + offset[et[2]], pos))
                for nt in node:
                    cand = [src for et, src, _, _ in found if et[0] == nt]
                    cand = torch.cat(cand) if cand else empty
                    fresh = cand[self._local[nt][cand] < 0].unique()
                    offset[nt] = node[nt].numel()
                    node[nt] = torch.cat([node[nt], fresh])
                    self._local[nt][fresh] = torch.arange(offset[nt], node[nt].numel(), device=self.device)
                    frontier[nt] = fresh
                    sampled_nodes[nt].append(fresh.numel())
                for et, src, dst_local, pos in found:  # one entry per hop and edge type
                    rows[et].append(self._local[et[0]][src])
                    cols[et].append(dst_local)
                    edges[et].append(pos)
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

    def _draw(
        self, et: EdgeType, frontier: Tensor, k: int, input_type: EdgeType, targets: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Up to ``k`` neighbours of each node of ``frontier`` over ``et``: ``(which, pos)``,
        the index into ``frontier`` and the CSC position of each sampled edge."""
        colptr = self.csc[et][1]
        start = colptr[frontier]
        deg = colptr[frontier + 1] - start
        allowed = self._allowed_fn(et, input_type, targets, frontier)
        if k < 0:
            return self._by_sort(torch.arange(frontier.numel(), device=self.device), start, deg, k, allowed)
        hub = deg > DRAW_FROM * k
        if not bool(hub.any()):  # a sync: the branch decides which kernels run
            return self._by_sort(torch.arange(frontier.numel(), device=self.device), start, deg, k, allowed)
        which_h, pos_h, missed = self._by_draws(hub.nonzero().flatten(), start, deg, k, allowed)
        rest = torch.cat([(~hub).nonzero().flatten(), missed])
        which_s, pos_s = self._by_sort(rest, start, deg, k, allowed)
        return torch.cat([which_s, which_h]), torch.cat([pos_s, pos_h])

    def _allowed_fn(self, et: EdgeType, input_type: EdgeType, targets: Tensor | None, frontier: Tensor):
        """``(which, pos) → bool mask``: which candidate edges are not a batch target (or
        its reverse); ``None`` when every edge of ``et`` is allowed."""
        if targets is None or targets.numel() == 0:
            return None
        if (et[0], et[2]) == (input_type[0], input_type[2]):
            key = lambda src, dst: src * self.num_nodes[input_type[2]] + dst  # noqa: E731
        elif (et[0], et[2]) == (input_type[2], input_type[0]):
            key = lambda src, dst: dst * self.num_nodes[input_type[2]] + src  # noqa: E731
        else:
            return None
        row = self.csc[et][0]
        return lambda which, pos: ~torch.isin(key(row[pos], frontier[which]), targets)

    def _by_sort(self, nodes: Tensor, start: Tensor, deg: Tensor, k: int, allowed) -> tuple[Tensor, Tensor]:
        """All allowed candidates of ``nodes`` (indices into the frontier), each node's in
        random order by one sort of (node, random key), cut at ``k``."""
        d = deg[nodes]
        seg = torch.repeat_interleave(torch.arange(nodes.numel(), device=self.device), d)  # a sync (output size)
        first = d.cumsum(0) - d
        pos = start[nodes][seg] + torch.arange(seg.numel(), device=self.device) - first[seg]
        if allowed is not None:
            keep = allowed(nodes[seg], pos)
            seg, pos = seg[keep], pos[keep]
        if k >= 0 and seg.numel():
            keys = torch.randint(0, 1 << 32, seg.shape, generator=self.generator, device=self.device)
            order = torch.sort((seg << 32) | keys, stable=True).indices
            seg, pos = seg[order], pos[order]
            counts = torch.bincount(seg, minlength=nodes.numel())
            rank = torch.arange(seg.numel(), device=self.device) - (counts.cumsum(0) - counts)[seg]
            keep = rank < k
            seg, pos = seg[keep], pos[keep]
        return nodes[seg], pos

    def _by_draws(self, hubs: Tensor, start: Tensor, deg: Tensor, k: int, allowed) -> tuple[Tensor, Tensor, Tensor]:
        """``2k`` draws with replacement per hub; the first ``k`` distinct allowed ones in
        draw order. Returns ``(which, pos, missed)``: hubs with fewer are ``missed`` (none
        of their draws kept)."""
        d = deg[hubs]
        u = torch.rand((hubs.numel(), 2 * k), generator=self.generator, device=self.device, dtype=torch.float64)
        pos = start[hubs][:, None] + torch.minimum((u * d[:, None]).long(), d[:, None] - 1)
        sorted_pos, order = torch.sort(pos, dim=1, stable=True)
        first_sorted = torch.ones_like(sorted_pos, dtype=torch.bool)
        first_sorted[:, 1:] = sorted_pos[:, 1:] != sorted_pos[:, :-1]
        ok = torch.empty_like(first_sorted).scatter_(1, order, first_sorted)  # first draw of its position
        if allowed is not None:
            ok &= allowed(hubs[:, None].expand_as(pos), pos)
        rank = ok.cumsum(1)
        done = rank[:, -1] >= k
        take = ok & (rank <= k) & done[:, None]
        which = hubs[:, None].expand_as(pos)[take]
        return which, pos[take], hubs[~done]
