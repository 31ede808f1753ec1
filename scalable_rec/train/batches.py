"""Supervision batches: which training edges supervise and which pass messages, and the
loader over a rank's slice of them (PyG's ``LinkNeighborLoader`` or the torch sampler under
PyG's ``LinkLoader``) with each batch's targets excluded from its own subgraph."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch_geometric.data import HeteroData
from torch_geometric.loader import LinkLoader, LinkNeighborLoader
from torch_geometric.sampler import EdgeSamplerInput

from scalable_rec.dist import DistEnv, EdgeEpochSampler
from scalable_rec.graph.hetero import MOVIE, RATES, REV_RATES, USER
from scalable_rec.graph.store import edge_ratings
from scalable_rec.train.config import TrainConfig
from scalable_rec.train.feed import BatchBuilder, Feed, SampleOnly, ToDevice
from scalable_rec.train.losses import rating_classes
from scalable_rec.train.sampler import TorchNeighborSampler, device_stores, sampler_bytes
from scalable_rec.train.workers import check_shm_room, loader_workers, shared_bytes

log = logging.getLogger(__name__)

# Edges per chunk when a statistic is gathered over all supervision edges: the gathered
# copies stay this small instead of one private copy of every supervision edge per rank.
STATS_CHUNK = 1 << 20
# Share of a CUDA device's free memory the torch sampler's graph may take under 'auto':
# the rest is left to the model, its optimiser state and a step's activations.
AUTO_DEVICE_SHARE = 0.5


class ExcludeTargets:
    """Loader transform: drops a batch's supervision edges, in both directions, from that
    batch's sampled message-passing edges (DGL's ``exclude="reverse_id"``).

    Edges are matched by their (user, movie) pair in global ids (``n_id``): shards hold one
    rating per pair, so a pair is an edge id, valid for the in-memory graph and the
    memory-mapped store alike (whose sampled ``e_id`` are CSC positions, not edge ids).
    Pads (``input_id >= num_edges``, zero-weight copies) exclude nothing. Under DDP each
    rank excludes its own batch's targets (as DGL's per-rank samplers do).

    Args:
        num_edges: Supervision edges before pads.
    """

    def __init__(self, num_edges: int) -> None:
        self.num_edges = num_edges

    def __call__(self, data):
        users, movies = data[USER].n_id, data[MOVIE].n_id
        u, m = data[RATES].edge_label_index
        real = data[RATES].input_id < self.num_edges
        targets = (users[u[real]] << 32) | movies[m[real]]  # node ids stay below 2**31
        for edge_type, (ui, mi) in ((RATES, (0, 1)), (REV_RATES, (1, 0))):
            store = data[edge_type]
            ei = store.edge_index
            keep = ~torch.isin((users[ei[ui]] << 32) | movies[ei[mi]], targets)
            store.edge_index = ei[:, keep]
            for key in ("e_id", "rating"):  # per-edge attributes follow their edges
                if key in store:
                    store[key] = store[key][keep]
        return data


class AttachRatings:
    """Loader transform for the mapped store pair: each sampled edge's ``rating``, looked up
    at its ``e_id`` (its CSC position) in the ratings ``open_stores`` put beside the CSC.
    (From ``HeteroData`` the loader gathers ``rating`` itself, as every edge attribute.)

    Args:
        ratings: Per edge type, the rating of every CSC position (``store.edge_ratings``).
    """

    def __init__(self, ratings: dict[tuple[str, str, str], Tensor]) -> None:
        self.ratings = ratings

    def __call__(self, data):
        for edge_type, rating in self.ratings.items():
            store = data[edge_type]
            store.rating = rating[store.e_id].float()
        return data


class Compose:
    """Loader transforms applied in order."""

    def __init__(self, *transforms) -> None:
        self.transforms = [t for t in transforms if t is not None]

    def __call__(self, data):
        for transform in self.transforms:
            data = transform(data)
        return data


@dataclass
class SupervisionEdges:
    """The supervision edges, gathered one batch at a time (the loader's ``input_data``).

    ``src``, ``dst`` and ``rating`` are every rating edge's arrays and ``ids`` the
    supervising edges' ids into them: with the graph index all four are the mapped files
    (``edges/*``, ``split/train``), so a batch reads its rows from the page cache that every
    rank of a node shares, and no rank holds a private copy of all supervision edges (PyG's
    ``EdgeSamplerInput`` clones the ``edge_label_index`` rows it is given). Positions from
    ``num_edges`` on are the pads the sampler deals so that ranks get equal slices: pad
    ``num_edges + k`` repeats edge ``k`` with weight 0.

    Args:
        src: User of every rating edge.
        dst: Movie of every rating edge.
        rating: Rating of every rating edge.
        ids: Ids of the supervision edges into ``src``/``dst``/``rating``.
        class_weight: Weight per half-star class (``losses.rating_class_table``); ``None``
            weighs every edge 1.
    """

    src: Tensor
    dst: Tensor
    rating: Tensor
    ids: Tensor
    class_weight: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.src.numel()
        if self.dst.numel() != n or self.rating.numel() != n:
            raise ValueError(
                f"'src', 'dst' and 'rating' need one entry per edge (got {n}, {self.dst.numel()}, "
                f"{self.rating.numel()})"
            )
        if self.ids.numel() == 0:
            raise ValueError("'ids' needs at least one supervision edge (got none)")

    input_type = RATES  # what LinkLoader reads from its input_data besides indexing it

    @property
    def num_edges(self) -> int:
        return self.ids.numel()

    def __getitem__(self, index) -> EdgeSamplerInput:
        index = torch.as_tensor(index, dtype=torch.long)
        real = index < self.num_edges
        ids = self.ids[torch.where(real, index, index - self.num_edges)]
        rating = self.rating[ids].float()
        weight = real.float() if self.class_weight is None else self.class_weight[rating_classes(rating)] * real
        return EdgeSamplerInput(
            input_id=index,
            row=self.src[ids],
            col=self.dst[ids],
            label=torch.stack([rating, weight], 1),
            input_type=RATES,
        )

    def chunks(self):
        """``(dst, rating)`` of the supervision edges, ``STATS_CHUNK`` at a time."""
        for part in self.ids.split(STATS_CHUNK):
            yield self.dst[part], self.rating[part].float()


def supervision_stats(edges: SupervisionEdges, num_movies: int) -> dict[str, Tensor | float]:
    """Over all supervision edges, a chunk at a time: ``class_counts`` per half-star class,
    ``rating_mean`` and ``movie_counts`` (each movie's supervision edges)."""
    classes, movies = torch.zeros(0, dtype=torch.long), torch.zeros(num_movies, dtype=torch.long)
    total = 0.0
    for dst, rating in edges.chunks():
        c = torch.bincount(rating_classes(rating))
        classes = torch.nn.functional.pad(classes, (0, max(0, c.numel() - classes.numel())))
        classes[: c.numel()] += c
        movies += torch.bincount(dst, minlength=num_movies)
        total += float(rating.double().sum())
    return {"class_counts": classes, "rating_mean": total / edges.num_edges, "movie_counts": movies}


def make_loader(
    data,
    edges: SupervisionEdges,
    cfg: TrainConfig,
    batch_size: int,
    env: DistEnv,
    shuffle: bool,
    device: torch.device,
    generator: torch.Generator | None = None,
    exclude_targets: bool = False,
    build_on_device: bool | None = None,
) -> tuple[Feed, EdgeEpochSampler]:
    """Mini-batches of this rank's slice of the supervision ``edges``, each with its
    sampled subgraph (``cfg.sampler``: PyG's ``LinkNeighborLoader`` or the torch
    ``TorchNeighborSampler`` under PyG's ``LinkLoader``); returns ``(feed, sampler)``:
    iterating the ``Feed`` gives the batches on ``device``.

    Batch labels are ``[b, 2]``: rating and sample weight. ``world_size - 1`` zero-weight
    pads follow the real edges so that every rank gets the same number of batches. With
    ``exclude_targets`` each batch's targets leave its subgraph (``ExcludeTargets``, or the
    torch sampler never draws them). Every sampled edge gets its ``rating``: PyG's loader
    gathers it from ``HeteroData``, ``AttachRatings`` looks it up at its ``e_id`` elsewhere.

    ``build_on_device`` (PyG's sampler only; ``None``: on a CUDA device): the loader's
    workers only sample and the batch is built on ``device`` (``feed.BatchBuilder``: the
    same batch, features and ratings gathered there); ``False``: workers build the whole
    batch and it is copied.
    """
    n = edges.num_edges
    pad = env.world_size - 1  # enough for any remainder the sampler deals (also a re-dealt resume)
    sampler = EdgeEpochSampler(n, env.rank, env.world_size, cfg.seed, shuffle=shuffle)
    kind = resolve_sampler(cfg.sampler, data, device)
    workers = loader_workers(cfg.num_workers, device, env)
    if kind == "torch" and device.type != "cpu":
        if workers:
            log.info(
                "sampler: the torch sampler samples on %s in the training process (num_workers %d unused)",
                device,
                workers,
            )
        workers = 0  # CUDA tensors cannot be sampled in forked workers
    # PyG's loader is used as the per-batch sampling function (``link(index)`` samples and
    # filters the subgraph of the input edges at ``index``), with ``edges`` as its input:
    # built from one placeholder edge, because LinkLoader copies every ``edge_label_index``
    # row it is given into an ``EdgeSamplerInput``.
    placeholder = edges[torch.zeros(1, dtype=torch.long)]
    label_index = (RATES, torch.stack([placeholder.row, placeholder.col]))
    if kind == "torch":
        features, graph, perm = device_stores(data, device)
        ratings = (
            edge_ratings(features)
            if isinstance(data, tuple)
            else {et: data[et].rating.to(device) for et in (RATES, REV_RATES) if "rating" in data[et]}
        )
        neighbors = TorchNeighborSampler(
            graph,
            cfg.num_neighbors,
            seed=cfg.seed + env.rank,
            exclude_targets=exclude_targets,
            num_edges=n,
            edge_permutation=perm,
        )
        link = LinkLoader(
            (features, graph),
            neighbors,
            edge_label_index=label_index,
            edge_label=placeholder.label,
            batch_size=batch_size,
            filter_per_worker=False,
            transform=AttachRatings(ratings) if ratings else None,
        )
    else:
        if build_on_device is None:
            build_on_device = device.type == "cuda"
        exclude = ExcludeTargets(n) if exclude_targets else None
        link = LinkNeighborLoader(
            data,
            num_neighbors=cfg.num_neighbors,
            edge_label_index=label_index,
            edge_label=placeholder.label,
            batch_size=batch_size,
            # Built whole in the worker (filter_fn in collate), or sampled there alone.
            filter_per_worker=not build_on_device,
            transform=None
            if build_on_device
            else Compose(AttachRatings(edge_ratings(data[0])) if isinstance(data, tuple) else None, exclude),
        )
    link.input_data = edges
    sample_only = kind == "pyg" and build_on_device
    if workers > 0 and isinstance(data, HeteroData):
        # Worker processes map the same pages instead of each holding a copy (the mapped
        # store pair is file-mapped already): what they read, the sampler's graph and,
        # where they build the whole batch, the features and ratings they gather.
        read = worker_tensors(link.link_sampler, None if sample_only else data)
        check_shm_room(shared_bytes(read))
        for value in read:
            value.share_memory_()
    loader = DataLoader(
        range(n + pad),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=SampleOnly(link) if sample_only else link,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda" and kind == "pyg",
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
    )
    if sample_only:
        build = BatchBuilder(data, device, RATES, exclude, device_share=AUTO_DEVICE_SHARE)
    else:
        build = ToDevice(device)
    return Feed(loader, build), sampler


def worker_tensors(link_sampler, data: HeteroData | None = None) -> list[Tensor]:
    """The tensors sampling workers read, each once: the sampler's graph (PyG's CSC and
    edge permutation, or the torch sampler's) and, given ``data``, its node and edge
    attributes (features, ratings) for workers that build the whole batch."""
    if isinstance(link_sampler, TorchNeighborSampler):
        graph = [t for csc in link_sampler.csc.values() for t in csc]
        graph += list((link_sampler.edge_permutation or {}).values())
    else:  # PyG's NeighborSampler over HeteroData
        graph = [*link_sampler.row_dict.values(), *link_sampler.colptr_dict.values()]
        graph += list((link_sampler.perm or {}).values())
    attrs = []
    if data is not None:
        attrs = [v for store in data.stores for k, v in store.items() if k != "edge_index"]
    out, seen = [], set()
    for t in graph + attrs:
        if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            out.append(t)
    return out


def resolve_sampler(choice: str, data, device: torch.device) -> str:
    """``pyg`` or ``torch`` for ``TrainConfig.sampler`` ``choice`` on ``device``: ``auto``
    is ``torch`` on a CUDA device where the sampler's graph (``sampler_bytes``) takes at
    most ``AUTO_DEVICE_SHARE`` of the device's free memory, else ``pyg``."""
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "pyg"
    need = sampler_bytes(data)
    free, _ = torch.cuda.mem_get_info(device)
    kind = "torch" if need <= AUTO_DEVICE_SHARE * free else "pyg"
    log.info(
        "sampler auto: %s (the graph takes %.0f MiB on %s, %.0f MiB free)", kind, need / 2**20, device, free / 2**20
    )
    return kind


def supervision_edges(train_ids: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Training edge ids ``(message passing, supervision)`` for ``cfg.supervision``.

    ``disjoint`` draws its fixed supervision share with ``cfg.seed`` (the same on every
    rank); the other modes supervise and pass messages over all training edges (with
    ``exclude_targets`` each batch then drops its own targets).
    """
    if cfg.supervision != "disjoint":
        return train_ids, train_ids
    order = torch.randperm(train_ids.numel(), generator=torch.Generator().manual_seed(cfg.seed))
    n_target = max(1, int(round(train_ids.numel() * cfg.disjoint_ratio)))
    return train_ids[order[n_target:]].sort().values, train_ids[order[:n_target]].sort().values
