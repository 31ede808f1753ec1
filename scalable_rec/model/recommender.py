"""Heterogeneous GraphSAGE encoder with a rating MLP or a dot-product decoder.

Decoders:
- ``mlp`` (the article's): an MLP on ``[user ‖ movie]``. It can model non-linear
  user–movie interactions, but scoring the full catalog needs one MLP pass per pair
  (done here by splitting the first layer: ``W[u‖m] = W_u u + W_m m``).
- ``dot``: ``⟨u, m⟩ + b_user + b_movie + μ``. Scoring all pairs is one matrix multiply,
  orders of magnitude cheaper at catalog scale; on MovieLens it gives a similar or better
  RMSE than the MLP (docs/config-notes.md, "decoder"), because user/movie biases carry
  most of the explainable variance of explicit ratings.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import HeteroConv, SAGEConv

from scalable_rec.errors import ConfigError
from scalable_rec.graph.hetero import MOVIE, RATES, REV_RATES, USER
from scalable_rec.graph.relations import bucket_fractions, message_types, split_coo, splits_by_rating
from scalable_rec.model.config import ModelConfig  # re-export
from scalable_rec.model.gcmc import GCMCConv, inverse_total_degree
from scalable_rec.model.rating_center import RatingCenterConv, coo_deviation_adjacency
from scalable_rec.model.rating_embed import RatingEmbedConv
from scalable_rec.model.rating_scale import scaled_mean_layer

# Full-graph encoding goes through torch.sparse CSR (via torch-sparse); torch labels it
# beta on every call, which is noise for users of a stable code path.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def torch_sparse_runs_on(device: torch.device) -> bool:
    """Whether torch-sparse is installed with kernels for ``device`` (a CPU-only build,
    enough for neighbour sampling, has no CUDA kernels)."""
    import torch_geometric.typing as pyg_typing

    if not pyg_typing.WITH_TORCH_SPARSE:
        return False
    return device.type != "cuda" or torch.ops.torch_sparse.cuda_version() != -1


def torch_scatter_runs_on(device: torch.device) -> bool | None:
    """Whether torch-scatter has kernels for ``device``; ``None`` when it is not installed."""
    import torch_geometric.typing as pyg_typing

    if not pyg_typing.WITH_TORCH_SCATTER:
        return None
    return device.type != "cuda" or torch.ops.torch_scatter.cuda_version() != -1


def check_model_device(cfg: ModelConfig, device: torch.device) -> None:
    """Refuses a model that cannot train on ``device``, before any work starts.

    ``aggr`` max on CUDA aggregates by scatter (``edge_index``) unless torch-sparse has CUDA
    kernels; PyG's scatter then hands a max that needs gradients to torch-scatter, which
    fails inside the first step when torch-scatter was built CPU-only (the wheels that
    neighbour sampling needs). torch's own scatter-reduce would do; PyG prefers torch-scatter
    whenever it is importable.
    """
    if (
        device.type == "cuda"
        and cfg.aggr == "max"
        and not torch_sparse_runs_on(device)
        and torch_scatter_runs_on(device) is False
    ):
        raise ConfigError(
            "'aggr' max on CUDA needs torch-scatter or torch-sparse with CUDA kernels; the installed "
            "torch-scatter is CPU-only (use --aggr mean or sum, install a CUDA build of "
            "torch-scatter/torch-sparse, or train on the CPU)"
        )


def adjacency_kind(device: torch.device, aggr: str) -> str:
    """How SAGEConv aggregates on ``device``: ``torch_sparse`` (its ``SparseTensor``) where
    its kernels run there, else torch's ``csr`` for ``sum``/``mean``, else ``edge_index``
    (scatter; ``max`` without torch-sparse kernels, e.g. a CPU-only build on a GPU)."""
    if torch_sparse_runs_on(device):
        return "torch_sparse"
    return "csr" if aggr != "max" else "edge_index"


def sparse_adjacency(
    rowptr: Tensor, col: Tensor, num_src: int, device: torch.device, aggr: str, kind: str | None = None
):
    """The ``[num_dst, num_src]`` adjacency (CSR: ``rowptr`` over destinations, ``col`` =
    sources) that SAGEConv aggregates over on ``device``, as ``kind`` (default
    ``adjacency_kind(device, aggr)``); the sparse kinds make no ``[E, hidden]`` messages."""
    num_dst = rowptr.numel() - 1
    kind = kind or adjacency_kind(device, aggr)
    if kind == "torch_sparse":
        from torch_sparse import SparseTensor

        return SparseTensor(
            rowptr=rowptr, col=col, sparse_sizes=(num_dst, num_src), is_sorted=True, trust_data=True
        ).to(device)
    if kind == "csr":
        return torch.sparse_csr_tensor(
            rowptr, col, torch.ones(col.numel(), device=col.device), size=(num_dst, num_src)
        ).to(device)
    dst = torch.repeat_interleave(torch.arange(num_dst, device=rowptr.device), rowptr.diff())
    return torch.stack([col, dst]).to(device)


def training_adjacency_kind(device: torch.device) -> str:
    """What a training step aggregates over: torch-sparse's ``SparseTensor`` where its
    kernels run on ``device`` (its fused sparse-dense product; inputs cast to fp32 stay
    fp32 under autocast), else ``edge_index`` (scatter). Scatter makes an ``[E, hidden]``
    message tensor per edge type and layer, and a mean's count and division as large again,
    forward and backward: at 25M edges the fused product cut a step's allocations from
    1,259 to 935 MiB (``benchmarks/step_allocations.py``; README "Graphs larger than
    memory"). torch's CSR, which full-graph encoding falls back to, is not used for
    training: under CUDA autocast its sum runs in the autocast dtype, where a mean's sum
    over many neighbours can overflow fp16."""
    return "torch_sparse" if torch_sparse_runs_on(device) else "edge_index"


def edge_adjacency(
    edge_index: Tensor,
    num_src: int,
    num_dst: int,
    aggr: str,
    kind: str | None = None,
    device: torch.device | None = None,
):
    """``sparse_adjacency`` of a COO ``edge_index`` (row 0 sources, row 1 destinations, as
    PyG's loaders give them), built where ``edge_index`` is and moved to ``device``
    (default: there too)."""
    device = device or edge_index.device
    kind = kind or adjacency_kind(device, aggr)
    if kind == "edge_index":
        return edge_index.to(device)
    src, dst = edge_index
    perm = torch.argsort(dst * num_src + src)  # by destination, then source (as ToSparseTensor)
    rowptr = torch.zeros(num_dst + 1, dtype=torch.long, device=edge_index.device)
    rowptr[1:] = torch.bincount(dst, minlength=num_dst).cumsum(0)
    return sparse_adjacency(rowptr, src[perm], num_src, device, aggr, kind)


def fp32_guard(active: bool, device: torch.device):
    """Autocast off (fp32) inside the block when ``active``; a no-op otherwise."""
    return torch.autocast(device.type, enabled=False) if active else contextlib.nullcontext()


class HeteroSAGEEncoder(nn.Module):
    """User and movie embeddings refined by ``num_layers`` hetero GraphSAGE layers.

    Inputs are global node ids (``n_id``) for the embedding tables and movie features.
    Every layer's input is cast to fp32 before message passing, so the scatter over all
    neighbours accumulates in fp32. With ``aggr="mean"``/``"max"`` the aggregate is no
    larger than its inputs, and SAGEConv's linear layers then run in the autocast dtype
    (the matmul speed-up stays). With ``aggr="sum"`` a node with many neighbours sums past
    fp16's 65504, and an autocast linear layer would cast that sum back to fp16 (inf);
    so would the backward of every layer below it (the hub's gradient is as large): the
    whole encoder then runs with autocast off, in fp32 (``fp32_guard``), and so do the
    decoder and retrieval head that consume its output (``Recommender``).

    A user id at or past the end of the user table (a user added after training, or one
    hidden by ``user_id_dropout``) gets the "unknown user" input vector instead of a row.
    Likewise a movie whose row was never trained (``movie_trained`` is 0: training saw no
    rating of it), one past the movie table, or one hidden by ``movie_id_dropout`` gets the
    "unknown movie" vector plus its projected features: a cold movie is placed by its
    title and genres alone, not by a randomly initialised row.
    """

    def __init__(self, num_users: int, num_movies: int, movie_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.user_emb = nn.Embedding(num_users, h)
        self.movie_emb = nn.Embedding(num_movies, h)
        self.movie_lin = nn.Linear(movie_dim, h)
        self.rating_messages = cfg.rating_messages
        # gcmc: each relation's sum is scaled by 1 / the destination's total in-degree
        self.gcmc = cfg.rating_messages == "gcmc"
        # scale: one mean per direction, each message times a learned scalar of its bucket
        self.scale = cfg.rating_messages == "scale"
        # both divide every relation's sum by the destination's in-degree over all buckets
        self.total_degree = self.gcmc or self.scale
        # embed: each message plus a learned vector of its rating bucket (zero at the start)
        self.embed = cfg.rating_messages == "embed"
        # center: users add a second mean, each movie times the rating's deviation from
        # the user's mean rating (zero at the start)
        self.center = cfg.rating_messages == "center"

        def layer() -> HeteroConv:
            if self.scale:
                return scaled_mean_layer(h)
            return HeteroConv({et: conv(et) for et in message_types(cfg.rating_messages)}, aggr="sum")

        def conv(et):
            if self.gcmc:
                return GCMCConv((h, h), h)
            if self.embed:
                return RatingEmbedConv((h, h), h)
            if self.center and et == REV_RATES:
                return RatingCenterConv((h, h), h, aggr=cfg.aggr)
            return SAGEConv((h, h), h, aggr=cfg.aggr)

        self.convs = nn.ModuleList(layer() for _ in range(cfg.num_layers))
        self.dropout = cfg.dropout
        self.unbounded = cfg.aggr == "sum"
        self.aggr = cfg.aggr
        # Only a model trained with ID dropout learns its own vector; otherwise the table's
        # mean stands in (and no parameter sits unused, which DDP would have to search for).
        self.unknown_user = nn.Parameter(torch.zeros(h)) if cfg.user_id_dropout > 0 else None
        self.unknown_movie = nn.Parameter(torch.zeros(h)) if cfg.movie_id_dropout > 0 else None
        # 1 where the movie's ID row was trained; training sets it from its training edges
        # (uint8, not bool: DDP broadcasts buffers and every backend takes uint8).
        self.register_buffer("movie_trained", torch.ones(num_movies, dtype=torch.uint8))
        nn.init.normal_(self.user_emb.weight, std=0.1)
        nn.init.normal_(self.movie_emb.weight, std=0.1)

    def input_features(self, n_id: dict[str, Tensor], movie_x: Tensor) -> dict[str, Tensor]:
        """Layer-0 inputs: user table rows (the unknown-user vector past its end) and movie
        embeddings plus projected features."""
        uid = n_id[USER]
        rows = self.user_emb.num_embeddings
        users = self.user_emb(uid.clamp(max=rows - 1))
        known = (uid < rows)[:, None]
        # No host sync in training: a learned vector is always blended in; the table mean is
        # only needed at inference (training graphs never hold ids past the table).
        if self.unknown_user is not None:
            users = torch.where(known, users, self.unknown_user.to(users.dtype))
        elif not self.training and not bool(known.all()):
            users = torch.where(known, users, self.user_emb.weight.mean(0).to(users.dtype))
        return {USER: users, MOVIE: self._movie_rows(n_id[MOVIE]) + self.movie_lin(movie_x)}

    def movie_known(self, mid: Tensor) -> Tensor:
        """True where movie ``mid`` has a trained ID row (inside the table and trained)."""
        rows = self.movie_emb.num_embeddings
        return (mid < rows) & self.movie_trained[mid.clamp(max=rows - 1)].bool()

    def trained_movie_mean(self) -> Tensor:
        """Mean of the trained movie rows (the unknown-movie input without a learned one)."""
        weight = self.movie_emb.weight
        mask = self.movie_trained.to(weight.dtype)[:, None]
        return (weight * mask).sum(0) / mask.sum().clamp(min=1)

    def _movie_rows(self, mid: Tensor) -> Tensor:
        movies = self.movie_emb(mid.clamp(max=self.movie_emb.num_embeddings - 1))
        # Training batches hold only trained movies (their edges are training edges), so
        # without a learned vector nothing is replaced there and no host sync happens.
        if self.unknown_movie is None and self.training:
            return movies
        known = self.movie_known(mid)[:, None]
        if self.unknown_movie is not None:
            return torch.where(known, movies, self.unknown_movie.to(movies.dtype))
        if bool(known.all()):
            return movies
        return torch.where(known, movies, self.trained_movie_mean().to(movies.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints from before ``movie_trained`` existed: every row counts as trained
        # (their behaviour then is unchanged).
        state_dict.setdefault(prefix + "movie_trained", torch.ones_like(self.movie_trained))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self, n_id: dict[str, Tensor], movie_x: Tensor, edge_index: dict, rating_inputs: dict | None = None
    ) -> dict[str, Tensor]:
        """``rating_inputs`` (``Recommender._rating_inputs``): with ``embed``, per edge type,
        ``[num_dst, 3]`` bucket fractions of each destination over the edges of ``edge_index``
        (``relations.bucket_fractions``); with ``center``, for ``rev_rates``, the users'
        ``rating_center.deviation_adjacency``."""
        if self.embed and rating_inputs is None:
            raise ValueError("rating_messages 'embed' needs each destination's bucket fractions ('rating_inputs')")
        if self.center and rating_inputs is None:
            raise ValueError("rating_messages 'center' needs the users' deviation adjacency ('rating_inputs')")
        with fp32_guard(self.unbounded, movie_x.device):
            x = self.input_features(n_id, movie_x)
            kwargs = {}
            if self.embed:
                kwargs["bucket_frac_dict"] = rating_inputs
            if self.center:
                kwargs["deviation_dict"] = rating_inputs
            if self.total_degree:  # one degree per destination over all its relations, every layer
                inv = inverse_total_degree(edge_index, {t: v.size(0) for t, v in x.items()})
                kwargs["inv_degree_dict"] = {et: inv[et[2]] for et in edge_index}
            for i, conv in enumerate(self.convs):
                x = conv({k: v.float() for k, v in x.items()}, edge_index, **kwargs)
                if i < len(self.convs) - 1:
                    x = {k: F.dropout(F.relu(v), self.dropout, self.training) for k, v in x.items()}
        return x


class DotDecoder(nn.Module):
    """``⟨u, m⟩ + b_u + b_m + μ``: all-pairs scores are a matrix multiply.

    A user id past the bias table (unknown user) gets a learned bias when the model was
    trained with user ID dropout, else the table's mean. A movie id past the table, or one
    whose row ``movie_trained`` marks untrained, likewise gets a learned bias (movie ID
    dropout) or the mean bias of the trained movies.
    """

    def __init__(
        self,
        num_users: int,
        num_movies: int,
        hidden: int,
        learn_unknown: bool = False,
        learn_unknown_movie: bool = False,
    ) -> None:
        super().__init__()
        self.user_bias = nn.Embedding(num_users, 1)
        self.movie_bias = nn.Embedding(num_movies, 1)
        self.unknown_bias = nn.Parameter(torch.zeros(1)) if learn_unknown else None
        self.unknown_movie_bias = nn.Parameter(torch.zeros(1)) if learn_unknown_movie else None
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.movie_bias.weight)

    def _user_bias(self, uid: Tensor) -> Tensor:
        rows = self.user_bias.num_embeddings
        bias = self.user_bias(uid.clamp(max=rows - 1)).squeeze(-1)
        known = uid < rows
        if self.unknown_bias is not None:
            return torch.where(known, bias, self.unknown_bias.to(bias.dtype))
        if not self.training and not bool(known.all()):
            return torch.where(known, bias, self.user_bias.weight.mean(0).to(bias.dtype))
        return bias

    def _movie_bias(self, mid: Tensor, movie_trained: Tensor | None) -> Tensor:
        rows = self.movie_bias.num_embeddings
        bias = self.movie_bias(mid.clamp(max=rows - 1)).squeeze(-1)
        known = mid < rows
        if movie_trained is not None:
            known = known & movie_trained[mid.clamp(max=rows - 1)].bool()
        if self.unknown_movie_bias is not None:
            return torch.where(known, bias, self.unknown_movie_bias.to(bias.dtype))
        if not self.training and not bool(known.all()):
            # the trained rows' mean: untrained rows still hold their zero init
            mask = (torch.ones(rows, device=bias.device) if movie_trained is None else movie_trained).to(bias.dtype)
            mean = (self.movie_bias.weight.squeeze(-1) * mask).sum() / mask.sum().clamp(min=1)
            return torch.where(known, bias, mean)
        return bias

    def forward(self, zu: Tensor, zm: Tensor, uid: Tensor, mid: Tensor, movie_trained: Tensor | None = None) -> Tensor:
        return (zu * zm).sum(-1) + self._user_bias(uid) + self._movie_bias(mid, movie_trained)

    def score_block(
        self, zu: Tensor, zm: Tensor, uid: Tensor, mid: Tensor, movie_trained: Tensor | None = None
    ) -> Tensor:
        """Scores ``[len(uid), len(mid)]``; the matmul is the whole cost. ``movie_trained``:
        the encoder's mask of trained movie rows (others get the unknown-movie bias)."""
        out = zu @ zm.T
        out += self._user_bias(uid)[:, None]
        out += self._movie_bias(mid, movie_trained)[None, :]
        return out


class MLPDecoder(nn.Module):
    """The article's decoder: ``Linear(2h, h) → ReLU → Linear(h, 1)`` on ``[u ‖ m]``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(2 * hidden, hidden)
        self.lin2 = nn.Linear(hidden, 1)

    def forward(self, zu: Tensor, zm: Tensor, uid: Tensor, mid: Tensor, movie_trained: Tensor | None = None) -> Tensor:
        return self.lin2(F.relu(self.lin1(torch.cat([zu, zm], dim=-1)))).squeeze(-1)

    def score_block(
        self,
        zu: Tensor,
        zm: Tensor,
        uid: Tensor,
        mid: Tensor,
        movie_trained: Tensor | None = None,
        max_elements: int = 1 << 25,
    ) -> Tensor:
        """Scores all pairs without materialising ``[users, movies, 2h]`` inputs.

        ``lin1([u ‖ m]) = W_u u + W_m m + b``: the two halves are computed once per user
        and per movie, and only the ``[rows, movies, h]`` hidden activations of a few
        users at a time (``max_elements`` floats) exist at once.
        """
        h = zu.size(1)
        a = zu @ self.lin1.weight[:, :h].T + self.lin1.bias
        b = zm @ self.lin1.weight[:, h:].T
        out = zu.new_empty(zu.size(0), zm.size(0))
        rows = max(1, max_elements // max(1, zm.size(0) * h))
        for i in range(0, zu.size(0), rows):
            hidden = F.relu(a[i : i + rows, None, :] + b[None, :, :])
            out[i : i + rows] = (hidden @ self.lin2.weight.T).squeeze(-1) + self.lin2.bias
        return out


class RetrievalHead(nn.Module):
    """Projects encoder outputs into a ranking space; scores are a dot product (matmul-able).

    With ``id_embeddings`` every user and movie also has its own ranking vector, added to
    the projection of its encoder output (a matrix-factorisation residual beside the graph
    encoder). A user past the table (unknown user) or a cold movie has none: its ranking
    vector is the projection of its encoder output alone.

    With a ``temperature`` τ > 0 every ranking vector is L2-normalised and scaled by
    ``τ^-1/2``: dot products, and so the in-batch softmax's logits and every score, are
    cosines over τ. τ is a buffer, so a checkpoint carries it: one written before it
    existed loads with τ = 0 (raw dot products, as it was trained).
    """

    def __init__(
        self,
        hidden: int,
        num_users: int = 0,
        num_movies: int = 0,
        id_embeddings: bool = False,
        temperature: float = 0.0,
        movie_bias: bool = False,
        learn_unknown_movie: bool = False,
    ) -> None:
        super().__init__()
        self.user = nn.Linear(hidden, hidden, bias=False)
        self.movie = nn.Linear(hidden, hidden, bias=False)
        self.user_id = nn.Embedding(num_users, hidden) if id_embeddings else None
        self.movie_id = nn.Embedding(num_movies, hidden) if id_embeddings else None
        self.movie_bias = nn.Embedding(num_movies, 1) if movie_bias else None
        self.unknown_movie_bias = nn.Parameter(torch.zeros(1)) if movie_bias and learn_unknown_movie else None
        if self.movie_bias is not None:
            nn.init.zeros_(self.movie_bias.weight)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.tau = float(temperature)  # the buffer's value as a number: no device sync per call
        for table in (self.user_id, self.movie_id):
            if table is not None:
                nn.init.normal_(table.weight, std=0.1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        state_dict.setdefault(prefix + "temperature", torch.zeros_like(self.temperature))
        self.tau = float(state_dict[prefix + "temperature"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _scaled(self, v: Tensor) -> Tensor:
        """``v`` as the ranking space holds it: unit length over ``√τ`` with a temperature."""
        if self.tau <= 0:
            return v
        return F.normalize(v.float(), dim=-1).to(v.dtype) * self.tau**-0.5

    @property
    def out_features(self) -> int:
        return self.user.out_features + (self.movie_bias is not None)

    def _user_vector(self, ru: Tensor) -> Tensor:
        """A raw user vector as the ranking space holds it: scaled (``_scaled``), with the
        bias dimension (1) when movies have a ranking bias."""
        ru = self._scaled(ru)
        if self.movie_bias is None:
            return ru
        return torch.cat([ru, ru.new_ones(ru.size(0), 1)], dim=-1)

    def _movie_vector(self, rm: Tensor, mid: Tensor, known: Tensor) -> Tensor:
        """A raw movie vector as the ranking space holds it: scaled, with the bias dimension
        (``b_m`` where the movie has a trained row, the unknown-movie bias or 0 where not)."""
        rm = self._scaled(rm)
        if self.movie_bias is None:
            return rm
        rows = self.movie_bias.num_embeddings
        bias = self.movie_bias(mid.clamp(max=rows - 1))
        if self.unknown_movie_bias is not None:
            bias = torch.where(known[:, None], bias, self.unknown_movie_bias)
        else:  # 0, the value an untrained row keeps (the table starts at zero)
            bias = bias * known[:, None]
        return torch.cat([rm, bias.to(rm.dtype)], dim=-1)

    def project_user(self, zu: Tensor, uid: Tensor) -> Tensor:
        """``uid``: the rows' global user ids (only read with ``id_embeddings``)."""
        ru = self.user(zu)
        own = self._own_user(uid)
        return self._user_vector(ru if own is None else ru + own.to(ru.dtype))

    def project_movie(self, zm: Tensor, mid: Tensor, known: Tensor) -> Tensor:
        """``mid``: the rows' global movie ids; ``known``: where that movie has a trained ID
        row (``HeteroSAGEEncoder.movie_known``). Both are only read with ``id_embeddings``:
        a cold movie (untrained row, past the table, or hidden by movie ID dropout) gets no
        ID vector, so it is ranked from its encoder output, not a random row."""
        rm = self.movie(zm)
        own = self._own_movie(mid, known)
        return self._movie_vector(rm if own is None else rm + own.to(rm.dtype), mid, known)

    def _own_user(self, uid: Tensor) -> Tensor | None:
        if self.user_id is None:
            return None
        rows = self.user_id.num_embeddings
        return self.user_id(uid.clamp(max=rows - 1)) * (uid < rows)[:, None]

    def _own_movie(self, mid: Tensor, known: Tensor) -> Tensor | None:
        if self.movie_id is None:
            return None
        return self.movie_id(mid.clamp(max=self.movie_id.num_embeddings - 1)) * known[:, None]

    def forward(
        self, zu: Tensor, zm: Tensor, uid: Tensor, mid: Tensor, movie_known: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Ranking vectors of the users and of the movies, and the squared norms of their own
        ID vectors, ``‖p_u‖²`` and ``‖q_m‖²`` (fp32; 0 for a row without one: no ID vectors,
        past a table, hidden by ID dropout or a cold movie), from the same lookups the
        vectors used."""
        own_u, own_m = self._own_user(uid), self._own_movie(mid, movie_known)
        ru, rm = self.user(zu), self.movie(zm)
        sq_u, sq_m = torch.zeros(uid.shape, device=uid.device), torch.zeros(mid.shape, device=mid.device)
        if own_u is not None:
            ru, sq_u = ru + own_u.to(ru.dtype), own_u.float().pow(2).sum(-1)
        if own_m is not None:
            rm, sq_m = rm + own_m.to(rm.dtype), own_m.float().pow(2).sum(-1)
        return self._user_vector(ru), self._movie_vector(rm, mid, movie_known), sq_u, sq_m


class Recommender(nn.Module):
    """Encoder + decoder; predicts ratings for ``batch[RATES].edge_label_index``.

    Args:
        num_users: Rows of the user embedding table.
        num_movies: Rows of the movie embedding table.
        movie_dim: Width of movie features.
        cfg: Model shape.
        rating_mean: Global mean of training ratings, added to every prediction so the
            model learns deviations from it.
    """

    def __init__(
        self, num_users: int, num_movies: int, movie_dim: int, cfg: ModelConfig, rating_mean: float = 0.0
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = HeteroSAGEEncoder(num_users, num_movies, movie_dim, cfg)
        self.decoder = (
            DotDecoder(
                num_users,
                num_movies,
                cfg.hidden,
                learn_unknown=cfg.user_id_dropout > 0,
                learn_unknown_movie=cfg.movie_id_dropout > 0,
            )
            if cfg.decoder == "dot"
            else MLPDecoder(cfg.hidden)
        )
        self.retrieval = (
            RetrievalHead(
                cfg.hidden,
                num_users,
                num_movies,
                cfg.retrieval_ids,
                cfg.retrieval_temperature,
                cfg.retrieval_bias,
                learn_unknown_movie=cfg.movie_id_dropout > 0,
            )
            if cfg.retrieval_head
            else None
        )
        self.register_buffer("rating_mean", torch.tensor(float(rating_mean)))

    def forward(self, batch) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor] | None]:
        """Predicted ratings of the batch's labelled edges, and (with the retrieval head) the
        ranking embeddings ``(r_user, r_movie)`` of its labelled users and movies and the
        squared norms of their own ID vectors (``RetrievalHead.forward``); the loss scores
        every user against every movie of the (global) batch.

        In training, ``cfg.user_id_dropout`` of the batch's user nodes are given an id past
        the user table, i.e. treated as unknown users (encoder input and decoder bias).
        """
        n_id = {USER: batch[USER].n_id, MOVIE: batch[MOVIE].n_id}
        if self.training and self.cfg.user_id_dropout > 0:
            drop = torch.rand(n_id[USER].shape, device=n_id[USER].device) < self.cfg.user_id_dropout
            n_id[USER] = n_id[USER].masked_fill(drop, self.encoder.user_emb.num_embeddings)
        if self.training and self.cfg.movie_id_dropout > 0:
            drop = torch.rand(n_id[MOVIE].shape, device=n_id[MOVIE].device) < self.cfg.movie_id_dropout
            n_id[MOVIE] = n_id[MOVIE].masked_fill(drop, self.encoder.movie_emb.num_embeddings)
        device = batch[MOVIE].x.device
        adj = self._adjacency(batch, device, training_adjacency_kind(device))
        z = self.encoder(n_id, batch[MOVIE].x, adj, self._rating_inputs(batch, device))
        u, m = batch[RATES].edge_label_index
        zu, zm = z[USER][u], z[MOVIE][m]
        with self._guard(zu):
            pred = self.decoder(zu, zm, n_id[USER][u], n_id[MOVIE][m], self.encoder.movie_trained) + self.rating_mean
            if self.retrieval is None:
                return pred, None
            mid = n_id[MOVIE][m]
            return pred, self.retrieval(zu, zm, n_id[USER][u], mid, self.encoder.movie_known(mid))

    def _adjacency(self, data, device: torch.device, kind: str | None = None) -> dict:
        """Each edge type of ``data`` as the adjacency its SAGEConv aggregates over on
        ``device``, of ``kind`` (default: ``adjacency_kind``). With rating relations each
        edge type is split by its edges' ``rating`` first (every relation present, an
        empty one included: no SAGEConv sits unused in a step)."""
        edges = {}
        for et in (RATES, REV_RATES):
            if splits_by_rating(self.encoder.rating_messages):
                if "rating" not in data[et]:
                    raise ValueError(
                        f"rating_messages {self.encoder.rating_messages!r} needs each edge's 'rating' on {et} "
                        "(RatingGraph.hetero_data and the batch loaders attach it)"
                    )
                edges.update(split_coo(et, data[et].edge_index, data[et].rating))
            else:
                edges[et] = data[et].edge_index
        return {
            et: edge_adjacency(ei, data[et[0]].num_nodes, data[et[2]].num_nodes, self.encoder.aggr, kind, device)
            for et, ei in edges.items()
        }

    def _rating_inputs(self, data, device: torch.device) -> dict | None:
        """With ``embed``: per edge type of ``data``, each destination's bucket fractions over
        its edges in ``data`` (a batch's after target exclusion: the targets' ratings are not
        counted), on ``device``; with ``center``, the users' deviation adjacency over the
        ``rev_rates`` edges of ``data`` (likewise); ``None`` for the other modes."""
        if not (self.encoder.embed or self.encoder.center):
            return None
        out = {}
        for et in (REV_RATES,) if self.encoder.center else (RATES, REV_RATES):
            if "rating" not in data[et]:
                raise ValueError(
                    f"rating_messages {self.encoder.rating_messages!r} needs each edge's 'rating' on {et} "
                    "(RatingGraph.hetero_data and the batch loaders attach it)"
                )
            ei, rating = data[et].edge_index, data[et].rating
            if self.encoder.center:
                sizes = data[et[0]].num_nodes, data[et[2]].num_nodes
                out[et] = coo_deviation_adjacency(ei, rating, *sizes, device, torch_sparse_runs_on(device))
            else:
                out[et] = bucket_fractions(ei[1].to(device), rating.to(device), data[et[2]].num_nodes)
        return out

    def _guard(self, like: Tensor):
        """The heads read the encoder's output: in fp32 too when it is an unbounded sum."""
        return fp32_guard(self.encoder.unbounded, like.device)

    @torch.no_grad()
    def encode_all(self, data) -> dict[str, Tensor]:
        """Embeds every node once over the full graph ``data`` (all neighbours).

        Message passing runs on sparse adjacency (``SparseTensor``/CSR), so no per-edge
        message tensor ``[E, hidden]`` is materialised.
        """
        device = self.rating_mean.device
        n_id = {
            USER: torch.arange(data[USER].num_nodes, device=device),
            MOVIE: torch.arange(data[MOVIE].num_nodes, device=device),
        }
        z = self.encoder(
            n_id, data[MOVIE].x.to(device), self._adjacency(data, device), self._rating_inputs(data, device)
        )
        if self.retrieval is not None:
            with self._guard(z[USER]):
                z["user_rank"], z["movie_rank"], *_ = self.retrieval(
                    z[USER], z[MOVIE], n_id[USER], n_id[MOVIE], self.encoder.movie_known(n_id[MOVIE])
                )
        return z

    def score_block(self, z: dict[str, Tensor], uid: Tensor, mid: Tensor) -> Tensor:
        """Predicted ratings for all pairs of ``uid`` × ``mid`` (global node ids)."""
        zu, zm, uid, mid = self._rows(z[USER], uid), self._rows(z[MOVIE], mid), self._here(uid), self._here(mid)
        with self._guard(zu):
            return self.decoder.score_block(zu, zm, uid, mid, self.encoder.movie_trained) + self.rating_mean

    def rank_block(self, z: dict[str, Tensor], uid: Tensor, mid: Tensor) -> Tensor:
        """Ranking scores for all pairs of ``uid`` × ``mid``: the retrieval head's logits,
        or the predicted rating when the model has no retrieval head."""
        if self.retrieval is None:
            return self.score_block(z, uid, mid)
        return self._rows(z["user_rank"], uid) @ self._rows(z["movie_rank"], mid).T

    def predict_pairs(self, z: dict[str, Tensor], uid: Tensor, mid: Tensor) -> Tensor:
        """Predicted ratings of aligned pairs ``(uid[i], mid[i])``."""
        zu, zm, uid, mid = self._rows(z[USER], uid), self._rows(z[MOVIE], mid), self._here(uid), self._here(mid)
        with self._guard(zu):
            return self.decoder(zu, zm, uid, mid, self.encoder.movie_trained) + self.rating_mean

    def _here(self, t: Tensor) -> Tensor:
        return t.to(self.rating_mean.device)

    def _rows(self, t: Tensor, idx: Tensor) -> Tensor:
        """Rows ``idx`` of node embeddings ``t`` on this model's device. ``t`` may live on the
        CPU while the model runs on a GPU (layer-wise encoding keeps every node's embeddings
        there): only the rows a block needs are moved."""
        return self._here(t[idx.to(t.device)])

    def movies_here(self, z: dict[str, Tensor]) -> dict[str, Tensor]:
        """``z`` with the movie-side embeddings on this model's device, user-side ones where
        they are: every block of users is scored against the whole catalogue, so the catalogue
        is moved once rather than per block."""
        return {k: self._here(v) if k in (MOVIE, "movie_rank") else v for k, v in z.items()}
