"""``scalable-rec arango load``: MovieLens into ArangoDB as the article lays it out.

This prepares the ArangoDB *source* (it lives next to ``source.arango``); it is not a sink of
the pipeline, which writes only recommendations (``sink.arango``). It shares the idempotent,
count-checked ``import_documents`` with that sink.

Document collections ``Users`` and ``Movie``, edge collection ``Ratings`` (``_from:
Users/<userId>``, ``_to: Movie/<movieId>``, ``rating``, ``timestamp``) and the named graph
``movie_rating_graph`` with Ratings from Users to Movie. Documents keep their MovieLens ids
as ``_key`` and rating edges get the key ``<userId>-<movieId>``, so with
``on_duplicate="replace"`` a re-run (or a resent batch) replaces instead of duplicating.
The CSV is streamed; only the set of user ids is held, to write ``Users`` last.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from arango.database import StandardDatabase
from arango.exceptions import ArangoServerError
from tqdm.auto import tqdm

from scalable_rec.connection import ArangoConfig, connect, database_error
from scalable_rec.errors import DatabaseError
from scalable_rec.shards import KeyIndex
from scalable_rec.sink.arango import ImportCounts, ensure_collection, import_documents
from scalable_rec.sink.config import LoadConfig  # re-export
from scalable_rec.source.base import RatingBounds, validate_ratings
from scalable_rec.source.movielens import MovieLensSource
from scalable_rec.source.report import SkipReport

log = logging.getLogger(__name__)

NO_GENRES = "(no genres listed)"
GRAPH_EXISTS = 1925


@dataclass
class LoadResult:
    """Per-collection import counts of one load."""

    movies: ImportCounts = field(default_factory=ImportCounts)
    users: ImportCounts = field(default_factory=ImportCounts)
    ratings: ImportCounts = field(default_factory=ImportCounts)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ensure_graph(db: StandardDatabase, layout: ArangoConfig) -> None:
    """Creates the three collections and the named graph unless they exist with the right shape."""
    ensure_collection(db, layout.users_collection, edge=False)
    ensure_collection(db, layout.movies_collection, edge=False)
    ensure_collection(db, layout.ratings_collection, edge=True)
    wanted = {
        "edge_collection": layout.ratings_collection,
        "from_vertex_collections": [layout.users_collection],
        "to_vertex_collections": [layout.movies_collection],
    }

    def check_existing() -> None:
        found = db.graph(layout.graph_name).edge_definitions()
        if not any(
            d["edge_collection"] == wanted["edge_collection"]
            and sorted(d["from_vertex_collections"]) == wanted["from_vertex_collections"]
            and sorted(d["to_vertex_collections"]) == wanted["to_vertex_collections"]
            for d in found
        ):
            raise DatabaseError(
                f"Graph '{layout.graph_name}' exists with edge definitions {found}, expected one of them to be {wanted}"
            )

    try:
        if db.has_graph(layout.graph_name):
            check_existing()
            return
        try:
            db.create_graph(layout.graph_name, edge_definitions=[wanted])
        except ArangoServerError as err:
            if err.error_code != GRAPH_EXISTS:
                raise
            # python-arango re-sent a create whose answer was lost (or someone else created it):
            # fine when the graph that exists is the one wanted.
            log.info("graph %s already exists (a re-sent create?); checking its definition", layout.graph_name)
            check_existing()
    except ArangoServerError as err:
        raise database_error(err, f"Creating graph '{layout.graph_name}'") from err


def load_movielens(
    db: StandardDatabase,
    source: MovieLensSource,
    layout: ArangoConfig,
    cfg: LoadConfig = LoadConfig(),
    report: SkipReport | None = None,
    bounds: RatingBounds = RatingBounds(),
) -> LoadResult:
    """Writes a MovieLens directory into ``db``; idempotent.

    Args:
        db: Target database (must exist).
        source: The MovieLens CSVs, read as record batches.
        layout: Collection and graph names, retry settings.
        cfg: Import batch size.
        report: Counts CSV rows the source could not parse and ratings that ``validate_ratings``
            rejects (NaN/inf, outside ``bounds``, unknown movie), exactly as ``prepare`` does
            (strict mode raises).
        bounds: Valid rating range.
    """
    report = report or SkipReport()
    ensure_graph(db, layout)
    policy = layout.retry_policy()
    result = LoadResult()
    users_index, movies_index = KeyIndex(), KeyIndex()

    def import_all(name: str, docs: Iterator[dict[str, Any]]) -> ImportCounts:
        with tqdm(desc=f"load {name}", unit="doc", disable=None) as bar:
            return import_documents(db.collection(name), docs, policy, max_docs=cfg.load_batch_size, progress=bar)

    def movie_docs() -> Iterator[dict[str, Any]]:
        for batch in source.movies(report):
            for key, title, genres in zip(
                batch.column("key").to_pylist(), batch.column("title").to_pylist(), batch.column("genres").to_pylist()
            ):
                movies_index.add(key)
                yield {
                    "_key": str(key),
                    "title": title,
                    "genres": [g for g in (genres or "").split("|") if g and g != NO_GENRES],
                }

    def rating_docs() -> Iterator[dict[str, Any]]:
        users, movies = layout.users_collection, layout.movies_collection
        for batch in source.ratings(report):
            # The same validator as ``prepare``: NaN/inf and out-of-range ratings are skipped and counted.
            edges = validate_ratings(batch, users_index, movies_index, report, bounds, insert_users=True)
            user_keys, movie_keys = users_index.keys, movies_index.keys
            for src, dst, rating, ts in zip(
                edges.column("src").to_pylist(),
                edges.column("dst").to_pylist(),
                edges.column("rating").to_pylist(),
                edges.column("timestamp").to_pylist(),
            ):
                user, movie = user_keys[src], movie_keys[dst]
                yield {
                    "_key": f"{user}-{movie}",
                    "_from": f"{users}/{user}",
                    "_to": f"{movies}/{movie}",
                    "rating": round(rating, 4),
                    "timestamp": ts,
                }

    result.movies = import_all(layout.movies_collection, movie_docs())
    result.ratings = import_all(layout.ratings_collection, rating_docs())
    result.users = import_all(layout.users_collection, ({"_key": str(u)} for u in sorted(users_index.keys)))
    log.info(
        "load: %d movies, %d users, %d ratings into %s (%s)",
        result.movies.sent,
        result.users.sent,
        result.ratings.sent,
        db.name,
        report.summary(),
    )
    return result


def load_movielens_dir(
    data_dir: str,
    layout: ArangoConfig,
    cfg: LoadConfig = LoadConfig(),
    strict: bool = False,
    bounds: RatingBounds = RatingBounds(),
) -> dict[str, Any]:
    """Connects with ``layout``'s settings and loads ``data_dir``; returns a JSON-able summary."""
    settings = layout.settings()
    db = connect(settings)
    report = SkipReport(strict=strict)
    result = load_movielens(db, MovieLensSource(data_dir), layout, cfg, report, bounds)
    return {
        "server": settings.describe(),
        "graph": layout.graph_name,
        **result.to_json(),
        "input_report": report.to_json(),
    }
