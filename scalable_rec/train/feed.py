"""Workers only sample; the batch is built where the model runs.

With PyG's CPU sampler, a loader worker used to build the whole ``HeteroData`` batch:
sampling, then the movie features and every sampled edge's rating gathered from the
message graph, then the batch's targets excluded; the process that feeds the GPU copied
the result. Here a worker runs PyG's sampling alone (``LinkLoader.collate_fn`` with
``filter_per_worker=False``) and returns a ``SampledBatch``: node ids, each sampled
edge's endpoints and edge id, and the supervision edges' ids and labels, integers but for
the ``[b, 2]`` labels. ``BatchBuilder`` copies that to the device (pinned, without blocking)
and builds the same ``HeteroData`` the loader's own filter builds, field for field, there:
node features and edge ratings gathered on the device from copies put there once, then the
loader's transform (target exclusion).

The copies go to the device when they take at most ``device_share`` of its free memory
(``torch.cuda.mem_get_info``, read once when the builder is made); otherwise each batch's
rows are gathered on the host into pinned memory and copied without blocking. On the CPU
the same code runs over the tensors where they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
from torch import Tensor
from torch_geometric.data import HeteroData
from torch_geometric.typing import EdgeType, NodeType

from scalable_rec.graph.store import edge_ratings

log = logging.getLogger(__name__)


@dataclass
class SampledBatch:
    """What a sampling worker returns: the sampler's draw, no feature or attribute.

    Args:
        node: Global node ids per node type, in the batch's local order.
        row: Local source node of each sampled edge, per edge type.
        col: Local destination node of each sampled edge, per edge type.
        edge: Edge id of each sampled edge (the sampler's permutation already applied).
        input_id: Positions of the batch's supervision edges in the loader's input.
        edge_label_index: The supervision edges in local node ids.
        edge_label: The supervision edges' labels (rating, weight).
    """

    node: dict[NodeType, Tensor]
    row: dict[EdgeType, Tensor]
    col: dict[EdgeType, Tensor]
    edge: dict[EdgeType, Tensor]
    input_id: Tensor
    edge_label_index: Tensor
    edge_label: Tensor

    def tensors(self) -> list[Tensor]:
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            out += list(value.values()) if isinstance(value, dict) else [value]
        return out

    def _apply(self, fn) -> SampledBatch:
        kw = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kw[f.name] = {k: fn(v) for k, v in value.items()} if isinstance(value, dict) else fn(value)
        return SampledBatch(**kw)

    def pin_memory(self) -> SampledBatch:
        """Called by the ``DataLoader``'s pin-memory thread."""
        return self._apply(lambda t: t.pin_memory())

    def to(self, device: torch.device, non_blocking: bool = False) -> SampledBatch:
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))


class SampleOnly:
    """A loader's ``collate_fn`` that runs PyG's sampling alone (``link.collate_fn``) and
    returns a ``SampledBatch``.

    Args:
        link: A PyG ``LinkLoader`` (e.g. ``LinkNeighborLoader``) made with
            ``filter_per_worker=False``, so its ``collate_fn`` gathers nothing.
    """

    def __init__(self, link) -> None:
        if link.filter_per_worker:
            raise ValueError("'link' needs filter_per_worker=False (got True: its collate_fn would build the batch)")
        self.link = link

    def __call__(self, index) -> SampledBatch:
        out = self.link.collate_fn(index)
        perm = self.link.link_sampler.edge_permutation or {}
        empty = torch.empty(0, dtype=torch.long)
        edges = {}
        for et in out.row:
            e = (out.edge or {}).get(et)
            e = empty if e is None else e.to(torch.long)
            edges[et] = perm[et][e] if perm.get(et) is not None else e
        input_id, label_index, label = out.metadata[:3]
        return SampledBatch(
            node=dict(out.node), row=dict(out.row), col=dict(out.col), edge=edges,
            input_id=input_id, edge_label_index=label_index, edge_label=label,
        )  # fmt: skip


class BatchBuilder:
    """Turns a ``SampledBatch`` into the training ``HeteroData`` on ``device``: the batch
    PyG's loader filter builds over ``data`` (then ``transform``), field for field.

    Args:
        data: The message graph the sampler draws from: a ``HeteroData`` (its node
            attributes, e.g. movie ``x``, and edge attributes, e.g. ``rating``, indexed by
            edge id) or the mapped store pair (node features from the feature store; each
            edge type's ratings at their CSC position, ``store.edge_ratings``).
        device: Where the batch is built.
        input_type: The supervision edges' type (their ids and labels go on it).
        transform: Applied to the built batch (e.g. ``ExcludeTargets``), on the device.
        device_share: On CUDA the attributes are copied to the device once when they take
            at most this share of its free memory; else gathered per batch on the host.
    """

    def __init__(
        self, data, device: torch.device, input_type: EdgeType, transform=None, device_share: float = 0.5
    ) -> None:
        self.device, self.input_type, self.transform = device, input_type, transform
        if isinstance(data, HeteroData):
            self.node_types, self.edge_types = list(data.node_types), list(data.edge_types)
            node_attrs = {
                nt: {k: v for k, v in data[nt].items() if k != "num_nodes" and isinstance(v, Tensor)}
                for nt in self.node_types
            }
            edge_attrs = {
                et: {k: v for k, v in data[et].items() if k != "edge_index" and isinstance(v, Tensor)}
                for et in self.edge_types
            }
            self.float_edge_attrs = False  # PyG's filter gathers the attribute as it is
        else:
            feature_store, graph_store = data
            groups = [a for a in feature_store.get_all_tensor_attrs() if isinstance(a.group_name, str)]
            self.node_types = list(dict.fromkeys(a.group_name for a in groups))
            self.edge_types = [a.edge_type for a in graph_store.get_all_edge_attrs() if a.layout.value == "csc"]
            node_attrs = {nt: {} for nt in self.node_types}
            for a in groups:
                node_attrs[a.group_name][a.attr_name] = feature_store.get_tensor(a.group_name, a.attr_name, index=None)
            edge_attrs = {et: {"rating": r} for et, r in edge_ratings(feature_store).items()}
            self.float_edge_attrs = True  # as AttachRatings: the stored dtype, gathered, as float
        self.resident = self._fits(node_attrs, edge_attrs, device_share)
        moved: dict[int, Tensor] = {}  # one copy of a tensor two edge types share

        def place(t: Tensor) -> Tensor:
            if not self.resident or t.device == device:
                return t
            if id(t) not in moved:
                moved[id(t)] = t.to(device)
            return moved[id(t)]

        self.node_attrs = {nt: {k: place(v) for k, v in a.items()} for nt, a in node_attrs.items()}
        self.edge_attrs = {et: {k: place(v) for k, v in a.items()} for et, a in edge_attrs.items()}

    def _fits(self, node_attrs, edge_attrs, share: float) -> bool:
        if self.device.type != "cuda":
            return True  # nothing to copy: gathered where they are
        seen, need = set(), 0
        for attrs in [*node_attrs.values(), *edge_attrs.values()]:
            for t in attrs.values():
                if id(t) not in seen:
                    seen.add(id(t))
                    need += t.numel() * t.element_size()
        free, _ = torch.cuda.mem_get_info(self.device)
        fits = need <= share * free
        log.info(
            "batch build on %s: features and edge attributes %s (%.0f MiB, %.0f MiB free)",
            self.device,
            "copied to the device once" if fits else "gathered per batch on the host into pinned memory",
            need / 2**20,
            free / 2**20,
        )
        return fits

    def _gather(self, value: Tensor, ids: Tensor, ids_host: Tensor) -> Tensor:
        if value.device == self.device:
            return value.index_select(0, ids)
        # Host-resident (too large for the device): rows gathered into pinned memory, copied
        # without blocking; the pinned block is not reused before the copy has run.
        out = torch.empty((ids_host.numel(), *value.shape[1:]), dtype=value.dtype, pin_memory=True)
        torch.index_select(value, 0, ids_host, out=out)
        return out.to(self.device, non_blocking=True)

    def __call__(self, sampled: SampledBatch) -> HeteroData:
        host = sampled
        sampled = sampled.to(self.device, non_blocking=True)  # from pinned memory: no wait
        data = HeteroData()
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        empty_host = torch.empty(0, dtype=torch.long)
        for nt in self.node_types:
            ids, ids_host = sampled.node.get(nt, empty), host.node.get(nt, empty_host)
            store = data[nt]
            store.num_nodes = ids_host.numel()
            for key, value in self.node_attrs[nt].items():
                store[key] = self._gather(value, ids, ids_host)
            store.n_id = ids
        for et in self.edge_types:
            store = data[et]
            store.edge_index = torch.stack([sampled.row.get(et, empty), sampled.col.get(et, empty)])
            e_id, e_host = sampled.edge.get(et, empty), host.edge.get(et, empty_host)
            for key, value in self.edge_attrs.get(et, {}).items():
                gathered = self._gather(value, e_id, e_host)
                store[key] = gathered.float() if self.float_edge_attrs else gathered
            store.e_id = e_id
        store = data[self.input_type]
        store.input_id, store.edge_label_index, store.edge_label = (
            sampled.input_id,
            sampled.edge_label_index,
            sampled.edge_label,
        )
        return data if self.transform is None else self.transform(data)


class ToDevice:
    """The build of a batch a worker built whole: a copy to ``device`` (from pinned memory,
    without blocking); none on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, batch: HeteroData) -> HeteroData:
        return batch if self.device.type == "cpu" else batch.to(self.device, non_blocking=True)


class Feed:
    """A rank's training batches: ``loader`` yields what its workers return and ``build``
    turns each into the batch on the device (``BatchBuilder``, or ``ToDevice``). Iterating
    a ``Feed`` builds on the current stream; ``prefetch.DevicePrefetcher`` builds on a side
    stream.

    Args:
        loader: The ``DataLoader`` over the rank's supervision edges.
        build: Host item → device batch.
    """

    def __init__(self, loader, build) -> None:
        self.loader, self.build = loader, build

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for item in self.loader:
            yield self.build(item)

    @property
    def num_workers(self) -> int:
        return self.loader.num_workers

    @property
    def collate_fn(self):
        return self.loader.collate_fn
