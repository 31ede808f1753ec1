"""Reaching ArangoDB: settings without leaking the password, one ``connect``, distinct errors.

Settings come from command-line flags, then the environment, then a JSON or INI config
file, then defaults. The password is read only from ``SCALABLE_REC_ARANGO_PASSWORD``,
``SCALABLE_REC_ARANGO_PASSWORD_FILE`` or the config file, never from a flag (flags show up
in process listings), and never appears in a ``repr``, a log line, an error or the run
directory: ``ArangoConfig`` (what the CLI and ``config.json`` hold) has no password field.

python-arango resends a request up to three times when the connection fails or the server
answers 503 with errorNum 503, then raises the builtin ``ConnectionAbortedError``.
``RetryPolicy`` adds exponential backoff on top for the operations that are safe to repeat
(idempotent imports, whole-partition reads). What counts as transient is deliberately narrow
(``is_transient``): a gateway or overload status (502, 503, 504), a dropped connection or a
timeout, and a write-write conflict (errorNum 1200); a 500 is never repeated, whatever its
errorNum (32 resource limit, 1521 unknown shard, ...), since the same request fails the same
way again. Cursor reads also start a partition over after 1600 (cursor gone) and 1601
(cursor busy), see ``is_cursor_retryable``. ``docs/arango.md`` has the whole error map.

python-arango and requests are imported by the functions that reach the server, not by this
module: the command line builds its flags from ``ArangoConfig`` before anything else loads
(docs/design.md, "Start-up").
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from scalable_rec.errors import (
    AuthenticationError,
    CollectionNotFoundError,
    ConfigError,
    DatabaseError,
    DatabaseNotFoundError,
    DatabaseUnreachableError,
    PermissionDeniedError,
)

if TYPE_CHECKING:
    from arango.collection import StandardCollection
    from arango.database import StandardDatabase

log = logging.getLogger(__name__)

ENV_URL = "SCALABLE_REC_ARANGO_URL"
ENV_DATABASE = "SCALABLE_REC_ARANGO_DB"
ENV_USER = "SCALABLE_REC_ARANGO_USER"
ENV_PASSWORD = "SCALABLE_REC_ARANGO_PASSWORD"
ENV_PASSWORD_FILE = "SCALABLE_REC_ARANGO_PASSWORD_FILE"
FILE_KEYS = ("url", "database", "username", "password", "password_file", "request_timeout", "ca_file")

# HTTP statuses worth repeating: a proxy or coordinator that lost its backend, overload,
# restarts and failovers. Write-write conflicts (1200, HTTP 409) ArangoDB documents as
# "retry the operation".
TRANSIENT_HTTP = frozenset({502, 503, 504})
WRITE_CONFLICT = 1200
CURSOR_NOT_FOUND = 1600
CURSOR_BUSY = 1601
# The next-batch route python-arango 8 uses (POST /_api/cursor/{id}) arrived in 3.8.
MIN_VERSION = (3, 8)

T = TypeVar("T")


@dataclass(frozen=True)
class ArangoSettings:
    """How to reach one ArangoDB database.

    Args:
        url: Server URL, ``http://`` or ``https://`` (TLS is handled by python-arango/requests).
            Must not carry credentials.
        database: Database name (default ``_system``).
        username: User for HTTP basic auth (default ``root``).
        password: Password; masked in ``repr`` and never logged.
        request_timeout: Seconds per HTTP request (default 60).
        http_retries: urllib3 retries of idempotent GETs and failed connects, with backoff.
        ca_file: CA bundle to verify the server's TLS certificate (default: system CAs).
    """

    url: str = "http://127.0.0.1:8529"
    database: str = "_system"
    username: str = "root"
    password: str = field(default="", repr=False)
    request_timeout: float = 60.0
    http_retries: int = 3
    ca_file: str | None = None

    def __post_init__(self) -> None:
        problems = []
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(f"'url' needs to be http(s)://host[:port] (got {parts.scheme}://{parts.hostname})")
        if parts.username is not None or parts.password is not None:
            # Reported without the URL itself: it holds a secret.
            problems.append(
                "'url' must not contain user:password@; set the user with "
                f"{ENV_USER} and the password with {ENV_PASSWORD} or {ENV_PASSWORD_FILE}"
            )
        if not self.database:
            problems.append("'database' needs to be a non-empty name")
        if self.request_timeout <= 0:
            problems.append(f"'request_timeout' needs to be positive (got {self.request_timeout})")
        if self.http_retries < 0:
            problems.append(f"'http_retries' needs to be >= 0 (got {self.http_retries})")
        if problems:
            raise ConfigError("Invalid ArangoDB settings: " + "; ".join(problems))

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "password")
        return f"ArangoSettings({shown}, password={'***' if self.password else ''!r})"

    __str__ = __repr__

    def describe(self) -> dict[str, Any]:
        """The settings without the password, for manifests, reports and logs."""
        return {"url": self.url, "database": self.database, "username": self.username}

    @classmethod
    def from_sources(
        cls, config_file: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ArangoSettings:
        """Resolves settings: ``overrides`` (flags) > environment > ``config_file`` > defaults.

        Args:
            config_file: JSON (an object, optionally under an ``"arango"`` key) or INI file (an
                ``[arango]`` section) with keys from ``url``, ``database``, ``username``,
                ``password``, ``password_file``, ``request_timeout``, ``ca_file``.
            environ: Environment to read (default ``os.environ``).
            overrides: Field values that win over everything else; ``None`` values are ignored.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = read_config_file(config_file) if config_file else {}
        file_password_file = values.pop("password_file", None)
        for key, var in (("url", ENV_URL), ("database", ENV_DATABASE), ("username", ENV_USER)):
            if env.get(var):
                values[key] = env[var]
        if ENV_PASSWORD in env:  # an empty password is a valid one
            values["password"] = env[ENV_PASSWORD]
        elif env.get(ENV_PASSWORD_FILE):
            values["password"] = _read_password_file(env[ENV_PASSWORD_FILE], ENV_PASSWORD_FILE)
        elif "password" not in values and file_password_file:
            values["password"] = _read_password_file(file_password_file, f"'password_file' in {config_file}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "request_timeout" in values:
            try:
                values["request_timeout"] = float(values["request_timeout"])
            except (TypeError, ValueError):
                raise ConfigError(
                    f"'request_timeout' needs to be a number of seconds (got {values['request_timeout']!r})"
                ) from None
        return cls(**values)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads connection settings from a JSON or INI file (see ``ArangoSettings.from_sources``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"Cannot read ArangoDB config file '{path}': {err.strerror}") from err
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"ArangoDB config file '{path}' is not valid JSON (line {err.lineno})") from None
        obj = obj.get("arango", obj) if isinstance(obj, dict) else obj
        if not isinstance(obj, dict):
            raise ConfigError(f"ArangoDB config file '{path}' needs a JSON object (got {type(obj).__name__})")
    else:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text, source=str(path))
        except configparser.Error as err:
            raise ConfigError(f"ArangoDB config file '{path}' is not valid INI: {err.message}") from None
        if not parser.has_section("arango"):
            raise ConfigError(f"ArangoDB config file '{path}' has no [arango] section (sections: {parser.sections()})")
        obj = dict(parser["arango"])
    unknown = sorted(set(obj) - set(FILE_KEYS))
    if unknown:
        raise ConfigError(
            f"ArangoDB config file '{path}' has unknown keys {unknown} (expected some of {list(FILE_KEYS)})"
        )
    return dict(obj)


def _read_password_file(path: str, what: str) -> str:
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as err:
        raise ConfigError(f"Cannot read the ArangoDB password file named by {what} ('{path}'): {err.strerror}") from err


@dataclass
class ArangoConfig:
    """Where the rating graph lives in ArangoDB and how to reach it (no secrets: stored in runs).

    Args:
        arango_url: Server URL (default: $SCALABLE_REC_ARANGO_URL, the config file, then
            http://127.0.0.1:8529). https:// URLs use TLS.
        arango_database: Database (default: $SCALABLE_REC_ARANGO_DB, the config file, then _system).
        arango_username: User (default: $SCALABLE_REC_ARANGO_USER, the config file, then root).
            The password comes only from $SCALABLE_REC_ARANGO_PASSWORD,
            $SCALABLE_REC_ARANGO_PASSWORD_FILE or the config file.
        arango_config_file: JSON or INI ([arango] section) file with url, database, username,
            password or password_file, request_timeout, ca_file.
        arango_timeout: Seconds per HTTP request.
        arango_ca_file: CA bundle for verifying the server's TLS certificate.
        arango_retries: Retries, with exponential backoff, of an import batch, a recommendation
            transaction or a lost or busy cursor's partition after python-arango's own three
            immediate tries (only for transient failures: see docs/arango.md).
        arango_backoff: First backoff in seconds; doubled per retry, capped at 30 s.
        users_collection: Document collection of users.
        movies_collection: Document collection of movies.
        ratings_collection: Edge collection of ratings (users → movies).
        graph_name: Named graph over the three collections.
    """

    arango_url: str | None = None
    arango_database: str | None = None
    arango_username: str | None = None
    arango_config_file: str | None = None
    arango_timeout: float | None = None
    arango_ca_file: str | None = None
    arango_retries: int = 5
    arango_backoff: float = 0.5
    users_collection: str = "Users"
    movies_collection: str = "Movie"
    ratings_collection: str = "Ratings"
    graph_name: str = "movie_rating_graph"

    def __post_init__(self) -> None:
        problems = []
        if self.arango_retries < 0:
            problems.append(f"'arango_retries' needs to be >= 0 (got {self.arango_retries})")
        if self.arango_backoff < 0:
            problems.append(f"'arango_backoff' needs to be >= 0 (got {self.arango_backoff})")
        if self.arango_url is not None:
            parts = urlsplit(self.arango_url)
            if parts.username is not None or parts.password is not None:
                # Refused before anything is written (config.json, checkpoints); named without
                # the URL itself, which holds the secret.
                problems.append(
                    f"'arango_url' must not contain user:password@ (it would be stored in the run "
                    f"directory); set the user with --arango-username or {ENV_USER} and the password "
                    f"with {ENV_PASSWORD} or {ENV_PASSWORD_FILE}"
                )
        names = [self.users_collection, self.movies_collection, self.ratings_collection]
        if len(set(names)) != 3:
            problems.append(f"users, movies and ratings collections need distinct names (got {names})")
        if problems:
            raise ValueError("; ".join(problems))

    def settings(self, environ: Mapping[str, str] | None = None) -> ArangoSettings:
        """Resolves connection settings: these flags > environment > config file > defaults."""
        return ArangoSettings.from_sources(
            self.arango_config_file,
            environ,
            url=self.arango_url,
            database=self.arango_database,
            username=self.arango_username,
            request_timeout=self.arango_timeout,
            ca_file=self.arango_ca_file,
        )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.arango_retries, backoff=self.arango_backoff)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for operations that are safe to repeat.

    Args:
        attempts: Retries after the first try.
        backoff: Seconds before the first retry; doubled each time.
        max_backoff: Cap on one wait.
    """

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0

    def delays(self) -> Iterator[float]:
        for i in range(self.attempts):
            yield min(self.max_backoff, self.backoff * (2**i))

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Runs ``fn``, repeating it after transient failures; other errors pass through.

        After the last retry the error is mapped to the package's ``DatabaseError`` family.
        """
        delays = self.delays()
        while True:
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - classified right below
                if not is_transient(err):
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise database_error(err, f"{what} (gave up after {self.attempts} retries)") from err
                log.warning("%s failed (%s); retrying in %.2fs", what, _short(err), delay)
                time.sleep(delay)


def is_transient(err: BaseException) -> bool:
    """True for failures a repeat may fix: a dropped connection or timeout, HTTP 502/503/504,
    a write-write conflict (errorNum 1200). Never a 500 or any other status."""
    import requests
    from arango.exceptions import ArangoServerError

    if isinstance(
        err,
        (
            ConnectionError,
            TimeoutError,
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.RetryError,
        ),
    ):
        return True
    if isinstance(err, ArangoServerError):
        return err.http_code in TRANSIENT_HTTP or err.error_code == WRITE_CONFLICT
    return False


def is_cursor_retryable(err: BaseException) -> bool:
    """True when a cursor read may start over: the cursor vanished (404/1600: ttl expired,
    coordinator restart) or is busy (409/1601: an earlier fetch, whose connection dropped,
    still holds it on the server while the driver's re-sent fetch arrives)."""
    from arango.exceptions import ArangoServerError

    return isinstance(err, ArangoServerError) and err.error_code in (CURSOR_NOT_FOUND, CURSOR_BUSY)


def database_error(err: BaseException, what: str, settings: ArangoSettings | None = None) -> DatabaseError:
    """Maps a python-arango or requests error to the package's error for it.

    Args:
        err: The error raised by the driver.
        what: What was being done, e.g. ``"import into 'Ratings'"``.
        settings: Connection settings, for naming the server (never the password).
    """
    from arango.exceptions import ArangoClientError, ArangoServerError

    where = f" on {settings.url} (database '{settings.database}')" if settings else ""
    if isinstance(err, ArangoServerError):
        code = (err.http_code, err.error_code)
        detail = f"[HTTP {err.http_code}][ERR {err.error_code}] {err.error_message or ''}".strip()
        if err.http_code == 401:
            # ArangoDB answers 401 both for a wrong password and for a database the user may not
            # see (it does not tell which, so that database names do not leak).
            user = f" for user '{settings.username}'" if settings else ""
            return AuthenticationError(
                f"{what}: ArangoDB rejected the credentials{user}{where} (HTTP 401): wrong "
                f"credentials or no access to this database. Check the user, "
                f"{ENV_PASSWORD} / {ENV_PASSWORD_FILE} and the user's database permissions"
            )
        if err.http_code == 403:
            user = f"user '{settings.username}'" if settings else "the user"
            return PermissionDeniedError(
                f"{what}: ArangoDB refused the request{where} (HTTP 403, {detail}); "
                f"{user} needs read/write access to the database and its collections"
            )
        if err.error_code == 1228 or code == (404, 1228):
            name = f"'{settings.database}' " if settings else ""
            return DatabaseNotFoundError(
                f"{what}: database {name}does not exist{where} (expected an existing "
                f"database, got errorNum 1228 'database not found')"
            )
        if err.error_code == 1203:
            return CollectionNotFoundError(f"{what}: collection not found{where} ({detail})")
        return DatabaseError(f"{what} failed{where}: {detail}")
    if is_transient(err) or isinstance(err, ArangoClientError):
        return DatabaseUnreachableError(f"{what}: could not reach ArangoDB{where}: {_short(err)}")
    return DatabaseError(f"{what} failed{where}: {_short(err)}")


def _short(err: BaseException, limit: int = 300) -> str:
    """The innermost cause's message (python-arango wraps requests' informative one)."""
    inner = err
    while (inner.__cause__ or inner.__context__) is not None:
        inner = inner.__cause__ or inner.__context__
    text = str(err) if inner is err else f"{err} ({type(inner).__name__}: {inner})"
    return text if len(text) <= limit else text[:limit] + "..."


def json_loads() -> Callable[[str], Any]:
    """The fastest JSON decoder at hand for python-arango's responses: orjson, else the stdlib's.

    Both raise ``ValueError`` on bad input, which python-arango expects of a deserializer.
    """
    try:
        import orjson
    except ImportError:  # pragma: no cover - orjson is a dependency; a bare install still works
        return json.loads
    return orjson.loads


def connect(settings: ArangoSettings, fast_json: bool = True) -> StandardDatabase:
    """Opens ``settings.database`` and verifies it with one request.

    Args:
        settings: Where and as whom.
        fast_json: Decode responses with orjson (``json_loads``) instead of the stdlib.

    Raises:
        DatabaseUnreachableError: No answer (DNS, refused, TLS, timeout).
        AuthenticationError: HTTP 401.
        DatabaseNotFoundError: errorNum 1228.
    """
    from arango import ArangoClient
    from arango.exceptions import ArangoClientError, ArangoServerError
    from arango.http import DefaultHTTPClient

    client = ArangoClient(
        hosts=settings.url,
        http_client=DefaultHTTPClient(
            request_timeout=settings.request_timeout, retry_attempts=settings.http_retries, backoff_factor=0.5
        ),
        verify_override=settings.ca_file,
        deserializer=json_loads() if fast_json else json.loads,
    )
    try:
        db = client.db(settings.database, username=settings.username, password=settings.password, verify=True)
    except (ArangoServerError, ArangoClientError) as err:
        client.close()
        raise database_error(err, f"Connecting to database '{settings.database}'", settings) from err
    try:
        check_version(server_version(db, settings))
    except DatabaseError:
        client.close()
        raise
    log.info("connected to %s database %s as %s", settings.url, settings.database, settings.username)
    return db


def server_version(db: StandardDatabase, settings: ArangoSettings | None = None) -> str | None:
    """The server's version string, or None when the server does not tell this user.

    A server started with ``--server.harden`` answers ``/_api/version`` without ``version``
    for users who are not administrators (python-arango's ``db.version()`` then raises a bare
    ``KeyError``), so the answer's body is read as a whole.
    """
    import requests
    from arango.exceptions import ArangoClientError, ArangoServerError

    try:
        body = db.version(details=True)
    except (ArangoServerError, ArangoClientError, ConnectionError, requests.exceptions.RequestException) as err:
        raise database_error(err, "Reading the server version", settings) from err
    version = body.get("version") if isinstance(body, dict) else None
    return str(version) if version is not None else None


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``3.11.4`` or ``3.12.0-devel``."""
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise DatabaseError(f"Cannot read the ArangoDB version: expected 'MAJOR.MINOR...', got {text!r}") from None


def check_version(text: str | None) -> None:
    """Refuses servers older than ``MIN_VERSION``; a hidden version (hardened server) is logged."""
    if text is None:
        log.warning(
            "ArangoDB does not tell this user its version (a server started with --server.harden "
            "answers it to administrators only): assuming %d.%d or later and reading with counted "
            "cursors, which are correct on every version",
            *MIN_VERSION,
        )
        return
    if parse_version(text) < MIN_VERSION:
        raise DatabaseError(
            f"ArangoDB {text} is too old: expected {MIN_VERSION[0]}.{MIN_VERSION[1]} or later "
            "(python-arango fetches cursor batches with POST /_api/cursor/<id>, which older "
            "servers do not have)"
        )


@dataclass(frozen=True)
class ServerInfo:
    """What the exporter needs to know about the server, read once at connect time.

    Args:
        version: (major, minor) of ``/_api/version``; None when the server hides it from this
            user (``--server.harden``).
        version_text: The full version string (None when hidden).
        role: ``/_admin/server/role``: SINGLE, COORDINATOR (a cluster), PRIMARY, AGENT, UNDEFINED.
    """

    version: tuple[int, int] | None
    version_text: str | None
    role: str

    @property
    def legacy_cursors(self) -> bool:
        """Before 3.11 cursors have no ``allowRetry``/``nextBatchId``: a re-sent fetch skips a batch.
        A hidden version is treated the same way: counted cursors are correct on every version."""
        return self.version is None or self.version < (3, 11)

    @property
    def cluster(self) -> bool:
        return self.role == "COORDINATOR"

    def describe(self) -> dict[str, Any]:
        return {"version": self.version_text if self.version_text is not None else "hidden", "role": self.role}


SUPPORTED_ROLES = ("SINGLE", "COORDINATOR")


def server_info(db: StandardDatabase) -> ServerInfo:
    """Reads the server's version and role.

    Raises:
        DatabaseError: The version cannot be parsed, is older than ``MIN_VERSION``, or the role
            is not one a client may read from (a DB-server or agent instead of a coordinator).
    """
    import requests
    from arango.exceptions import ArangoClientError, ArangoServerError

    text = server_version(db)
    check_version(text)
    try:
        role = str(db.role())
    except (ArangoServerError, ArangoClientError, ConnectionError, requests.exceptions.RequestException) as err:
        raise database_error(err, "Reading the server role") from err
    if role not in SUPPORTED_ROLES:
        raise DatabaseError(
            f"ArangoDB answers with role {role!r}: expected one of {SUPPORTED_ROLES} "
            "(connect to a single server or a cluster's coordinator)"
        )
    info = ServerInfo(None if text is None else parse_version(text), text, role)
    log.info("ArangoDB %s, role %s", text or "(version hidden)", role)
    return info


def require_collection(db: StandardDatabase, name: str, edge: bool | None = None) -> StandardCollection:
    """Returns collection ``name``, checking that it exists and, if given, its type.

    Raises:
        CollectionNotFoundError: It does not exist (errorNum 1203).
        DatabaseError: It exists with the other type.
    """
    import requests
    from arango.exceptions import ArangoServerError

    try:
        props = db.collection(name).properties()
    except ArangoServerError as err:
        if err.error_code == 1203:
            raise CollectionNotFoundError(
                f"Collection '{name}' does not exist in database '{db.name}' (errorNum 1203); expected "
                f"{'an edge' if edge else 'a document' if edge is False else 'a'} collection. Run "
                "'scalable-rec arango load' or pass the collection name"
            ) from err
        raise database_error(err, f"Reading collection '{name}'") from err
    except (ConnectionError, requests.exceptions.RequestException) as err:
        raise database_error(err, f"Reading collection '{name}'") from err
    if edge is not None and bool(props.get("edge")) != edge:
        want, got = ("an edge", "a document") if edge else ("a document", "an edge")
        raise DatabaseError(
            f"Collection '{name}' in database '{db.name}' is {got} collection, expected {want} collection"
        )
    return db.collection(name)
