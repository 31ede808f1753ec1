"""Shared by the rating-aware message tests (``gcmc``, ``embed``, ``scale``, ``center``): a graph
small enough to compute by hand, the one-layer model they probe, and ``scale``'s scalars
moved away from one and ``center``'s ``lin_c`` away from zero (where they start, the rating
would not reach the messages)."""

import pyarrow as pa
import torch

from scalable_rec.graph import RatingGraph
from scalable_rec.train import ModelConfig, Recommender


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
