"""Shared by the rating-aware message tests (``gcmc``, ``embed``, ``scale``, ``center``): a graph
small enough to compute by hand, the one-layer model they probe, and ``scale``'s scalars
moved away from one and ``center``'s ``lin_c`` away from zero (where they start, the rating
would not reach the messages)."""

import pyarrow as pa
import torch

from scalable_rec.dist import DistEnv
from scalable_rec.graph import RatingGraph, SplitConfig, split_edges
from scalable_rec.train import ModelConfig, Recommender, TrainConfig
from scalable_rec.train.batches import SupervisionEdges, make_loader


def three_user_graph(rating: list[float]) -> RatingGraph:
    """3 users, 2 movies: movie 0 rated by all three users, movie 1 by user 0."""
    return RatingGraph(
        user_keys=pa.array([0, 1, 2]),
        movie_keys=pa.array([0, 1]),
        movie_x=torch.randn(2, 4, generator=torch.Generator().manual_seed(0)),
        src=torch.tensor([0, 1, 2, 0]),
        dst=torch.tensor([0, 0, 0, 1]),
        rating=torch.tensor(rating),
        timestamp=torch.zeros(4, dtype=torch.long),
    )


def small_model(
    mode: str, num_layers: int = 1, num_users: int = 3, num_movies: int = 2, dim: int = 4, hidden: int = 4, **kw
) -> Recommender:
    """Seeded ``Recommender`` without a ranking head, in eval mode."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=hidden, num_layers=num_layers, rating_messages=mode, retrieval_head=False, **kw)
    return Recommender(num_users, num_movies, dim, cfg).eval()


@torch.no_grad()
def vary_scale_scalars(model: Recommender, values: list[float] | None = None) -> Recommender:
    """Every ``scale`` bucket scalar set to ``values`` (default: uniform in [-1, 2]) and every
    ``center`` ``lin_c`` (zero at the start) drawn at random; a model of another mode is
    returned unchanged."""
    for name, p in model.named_parameters():
        if name.endswith("core.scale"):
            p.copy_(torch.tensor(values)) if values is not None else p.uniform_(-1.0, 2.0)
        elif name.endswith("lin_c.weight"):
            p.normal_(std=0.3)
    return model


def target_excluding_loader(shards) -> tuple[RatingGraph, dict, object]:
    """The graph of ``shards``, every edge's rating by ``(user, movie)``, and a loader of its
    training edges (full neighbourhoods, batches of 32) with each batch's targets excluded."""
    g = RatingGraph.from_shards(shards)
    split = split_edges(g, SplitConfig(val_ratio=0.1, test_ratio=0.11))
    truth = {(u, m): r for u, m, r in zip(g.src.tolist(), g.dst.tolist(), g.rating.tolist())}
    loader, _ = make_loader(
        g.hetero_data(split.train),
        SupervisionEdges(g.src, g.dst, g.rating, split.train),
        TrainConfig(num_neighbors=[-1, -1], progress=False),
        32,
        DistEnv(),
        shuffle=True,
        device=torch.device("cpu"),
        exclude_targets=True,
    )
    return g, truth, loader
