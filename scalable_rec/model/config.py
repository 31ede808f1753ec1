"""The model stage's settings: the recommender's shape (``ModelConfig``) and full-catalog
scoring (``ScoreConfig``).

Plain dataclasses with no torch or PyG import, so that the command line can parse and
validate its flags before those load (docs/design.md, "Start-up").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelConfig:
    """Model shape and ranking head (design: docs/design.md#ranking-head).

    Args:
        hidden: Width of the embeddings and of every GraphSAGE layer; positive.
        num_layers: GraphSAGE layers, i.e. hops of message passing; at least 1, with one
            ``num_neighbors`` entry per layer.
        decoder: Rating decoder: ``dot`` (scores the catalog with one matrix multiply) or
            ``mlp`` (an MLP on ``[user ‖ movie]``).
        dropout: Dropout between layers, in [0, 1).
        aggr: Neighbour aggregation of SAGEConv: ``mean``, ``sum`` or ``max``.
        retrieval_head: Add a two-tower ranking head, trained with an in-batch sampled softmax
            beside the rating loss; top-K lists rank by it.
        user_id_dropout: Share of batch users, in [0, 1), whose ID embedding is replaced by
            the "unknown user" input during training, so users added after training can be
            served from their ratings alone.
        retrieval_ids: Give each user and movie its own ranking vector, added to the ranking
            head's projection of the encoder output; unknown nodes get the projection alone.
        movie_id_dropout: Share of batch movies, in [0, 1), given the "unknown movie" input
            (learned vector plus title/genre features) during training; movies without a
            trained row are always encoded that way.
        retrieval_temperature: τ ≥ 0: rank by cosine similarity over τ (ranking vectors
            L2-normalised in training and scoring); 0 ranks by the raw dot product.
        retrieval_bias: Give every movie a learned ranking bias, added to each of its ranking
            scores (one more dimension of the ranking vectors).
        rating_messages: How ratings reach the messages (docs/rating.md): ``none``, ``relation``,
            ``gcmc``, ``scale`` (per-bucket relations or scalars), ``embed`` (bucket vectors) or
            ``center`` (users add a mean weighted by each rating's deviation from their own).
    """

    hidden: int = 128
    num_layers: int = 2
    decoder: Literal["dot", "mlp"] = "dot"
    dropout: float = 0.3
    aggr: str = "mean"
    retrieval_head: bool = True
    user_id_dropout: float = 0.2
    retrieval_ids: bool = True
    movie_id_dropout: float = 0.2
    retrieval_temperature: float = 0.15
    retrieval_bias: bool = True
    rating_messages: Literal["none", "relation", "gcmc", "scale", "embed", "center"] = "none"

    def __post_init__(self) -> None:
        problems = []
        if self.hidden <= 0:
            problems.append(f"'hidden' needs to be positive (got {self.hidden})")
        if self.num_layers < 1:
            problems.append(f"'num_layers' needs to be at least 1 (got {self.num_layers})")
        if self.decoder not in ("dot", "mlp"):
            problems.append(f"'decoder' needs to be 'dot' or 'mlp' (got {self.decoder!r})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"'dropout' needs to be in [0, 1) (got {self.dropout})")
        if self.aggr not in ("mean", "sum", "max"):
            problems.append(f"'aggr' needs to be 'mean', 'sum' or 'max' (got {self.aggr!r})")
        if not 0.0 <= self.user_id_dropout < 1.0:
            problems.append(f"'user_id_dropout' needs to be in [0, 1) (got {self.user_id_dropout})")
        if not 0.0 <= self.movie_id_dropout < 1.0:
            problems.append(f"'movie_id_dropout' needs to be in [0, 1) (got {self.movie_id_dropout})")
        if self.retrieval_temperature < 0:
            problems.append(f"'retrieval_temperature' needs to be non-negative (got {self.retrieval_temperature})")
        if self.rating_messages not in ("none", "relation", "gcmc", "scale", "embed", "center"):
            problems.append(
                "'rating_messages' needs to be 'none', 'relation', 'gcmc', 'scale', 'embed' or 'center' "
                f"(got {self.rating_messages!r})"
            )
        elif self.rating_messages in ("gcmc", "scale") and self.aggr != "mean":
            problems.append(
                f"'rating_messages' {self.rating_messages} is a mean over all buckets' neighbours and needs "
                f"'aggr' mean (got {self.aggr!r})"
            )
        elif self.rating_messages == "embed" and self.aggr != "mean":
            problems.append(
                f"'rating_messages' embed adds its bucket vectors to a mean and needs 'aggr' mean (got {self.aggr!r})"
            )
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class ScoreConfig:
    """Full-catalog scoring settings.

    Args:
        k: Recommendations per user, positive.
        score_memory_mb: MiB of one block of scores on the CPU (users × movies × 4 bytes),
            positive; sets how many users are scored per chunk. On CUDA the chunk follows the
            device's free memory instead (``device_chunk_users``).
        exclude_rated: Never recommend a movie the user has rated anywhere in the input.
        score_device: Where ``score`` encodes and ranks: ``run`` (the device the run trained
            on), ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (e.g. score a GPU-trained run on a
            CPU machine).
    """

    k: int = 10
    score_memory_mb: int = 256
    exclude_rated: bool = True
    score_device: str = "run"

    def __post_init__(self) -> None:
        problems = []
        if self.k <= 0:
            problems.append(f"'k' needs to be positive (got {self.k})")
        if self.score_memory_mb <= 0:
            problems.append(f"'score_memory_mb' needs to be positive (got {self.score_memory_mb})")
        if not re.fullmatch(r"run|auto|cpu|cuda(:\d+)?", self.score_device):
            problems.append(f"'score_device' needs run, auto, cpu, cuda or cuda:N (got {self.score_device!r})")
        if problems:
            raise ValueError("; ".join(problems))

    def device_spec(self, trained_on: str) -> tuple[str, str]:
        """The device ``score`` runs on, given the device the run ``trained_on``, and the
        hint a refusal of it carries (set where the device is the run's, not a flag)."""
        if self.score_device != "run":
            return self.score_device, ""
        return trained_on, " (the run trained there; --score-device cpu scores it here)"

    def chunk_users(self, num_movies: int) -> int:
        return max(1, (self.score_memory_mb << 20) // (4 * max(1, num_movies)))
