"""Connection settings and errors: env/file resolution, masked password, distinct failures.

Tests that only talk to a server run against the test double, or against the real server
named by ``SCALABLE_REC_ARANGO_URL``.
"""

import json
import logging
import socket

import pytest
from arango.exceptions import ArangoServerError
from arango.request import Request
from arango.response import Response
from arango_double import ArangoDouble

from scalable_rec.connection import (
    ENV_DATABASE,
    ENV_PASSWORD,
    ENV_PASSWORD_FILE,
    ENV_URL,
    ENV_USER,
    ArangoConfig,
    ArangoSettings,
    RetryPolicy,
    connect,
    is_cursor_retryable,
    is_transient,
    require_collection,
    server_info,
)
from scalable_rec.errors import (
    AuthenticationError,
    CollectionNotFoundError,
    ConfigError,
    DatabaseError,
    DatabaseNotFoundError,
    DatabaseUnreachableError,
)

SECRET = "s3cret-do-not-print"


def _settings(endpoint, **changes) -> ArangoSettings:
    values = dict(
        url=endpoint.url,
        database=endpoint.database,
        username=endpoint.username,
        password=endpoint.password,
        http_retries=0,
    )
    return ArangoSettings(**{**values, **changes})


def test_settings_from_environment_and_password_file(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text(SECRET + "\n")
    env = {ENV_URL: "https://db.example:8529", ENV_DATABASE: "movies", ENV_USER: "rec", ENV_PASSWORD_FILE: str(secret)}
    s = ArangoSettings.from_sources(environ=env)
    assert (s.url, s.database, s.username, s.password) == ("https://db.example:8529", "movies", "rec", SECRET)
    assert ArangoSettings.from_sources(environ={**env, ENV_PASSWORD: "direct"}).password == "direct"
    # flags win over the environment
    assert ArangoSettings.from_sources(environ=env, database="other").database == "other"


@pytest.mark.parametrize("kind", ["json", "ini"])
def test_settings_from_config_file(tmp_path, kind):
    path = tmp_path / f"arango.{kind}"
    if kind == "json":
        path.write_text(
            json.dumps(
                {
                    "arango": {
                        "url": "http://h:1",
                        "database": "d",
                        "username": "u",
                        "password": SECRET,
                        "request_timeout": 5,
                    }
                }
            )
        )
    else:
        path.write_text(
            f"[arango]\nurl = http://h:1\ndatabase = d\nusername = u\npassword = {SECRET}\nrequest_timeout = 5\n"
        )
    s = ArangoSettings.from_sources(path, environ={})
    assert (s.url, s.database, s.username, s.password, s.request_timeout) == ("http://h:1", "d", "u", SECRET, 5.0)
    # the environment wins over the file
    assert ArangoSettings.from_sources(path, environ={ENV_DATABASE: "env_db"}).database == "env_db"


def test_config_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"url": "http://h:1", "passwd": "x"}')
    with pytest.raises(ConfigError, match=r"unknown keys \['passwd'\]"):
        ArangoSettings.from_sources(bad, environ={})
    ini = tmp_path / "a.ini"
    ini.write_text("[db]\nurl = http://h\n")
    with pytest.raises(ConfigError, match=r"no \[arango\] section \(sections: \['db'\]\)"):
        ArangoSettings.from_sources(ini, environ={})
    with pytest.raises(ConfigError, match="Cannot read the ArangoDB password file"):
        ArangoSettings.from_sources(environ={ENV_PASSWORD_FILE: str(tmp_path / "missing")})


def test_password_is_masked_and_never_in_url():
    s = ArangoSettings(url="http://h:1", password=SECRET)
    assert SECRET not in repr(s) and SECRET not in str(s) and "password='***'" in repr(s)
    assert SECRET not in json.dumps(s.describe())
    with pytest.raises(ConfigError, match="must not contain user:password@") as err:
        ArangoSettings(url=f"http://root:{SECRET}@h:1")
    assert SECRET not in str(err.value)
    with pytest.raises(ConfigError, match=r"'url' needs to be http\(s\)://host"):
        ArangoSettings(url="ftp://h")


def test_arango_config_has_no_password_field():
    # ArangoConfig is what the CLI builds and what config.json stores.
    assert not any("password" in name for name in ArangoConfig.__dataclass_fields__)


def test_retry_policy_backoff_doubles_and_caps():
    assert list(RetryPolicy(attempts=5, backoff=1.0, max_backoff=5.0).delays()) == [1, 2, 4, 5, 5]


def test_connect_and_require_collection(arango_endpoint):
    db = connect(_settings(arango_endpoint))
    db.create_collection("Things")
    db.create_collection("Links", edge=True)
    assert require_collection(db, "Things", edge=False).name == "Things"
    with pytest.raises(CollectionNotFoundError, match="Collection 'Nope' does not exist in database"):
        require_collection(db, "Nope")
    with pytest.raises(DatabaseError, match="'Links' .* is an edge collection, expected a document collection"):
        require_collection(db, "Links", edge=False)


def test_wrong_password_is_authentication_error_without_the_password(arango_endpoint, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(
        AuthenticationError,
        match=r"rejected the credentials for user '.*' .*HTTP 401\): wrong "
        "credentials or no access to this database",
    ) as err:
        connect(_settings(arango_endpoint, password=SECRET))
    assert SECRET not in str(err.value) and SECRET not in repr(err.value)
    assert SECRET not in caplog.text


def test_unknown_database_is_named(arango_endpoint):
    with pytest.raises(DatabaseNotFoundError, match="database 'no_such_db' does not exist .*1228"):
        connect(_settings(arango_endpoint, database="no_such_db"))


def test_unreachable_server():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DatabaseUnreachableError, match=f"could not reach ArangoDB on http://127.0.0.1:{port}"):
        connect(ArangoSettings(url=f"http://127.0.0.1:{port}", http_retries=0, request_timeout=2))


def _server_error(status: int, error_num: int | None) -> ArangoServerError:
    resp = Response("post", "http://h/_api/cursor", {}, status, "", json.dumps({"errorNum": error_num}))
    resp.body, resp.error_code, resp.error_message = {"errorNum": error_num}, error_num, "x"
    return ArangoServerError(resp, Request("post", "/_api/cursor"))


@pytest.mark.parametrize(
    "status, error_num, transient, cursor",
    [
        (503, 503, True, False),
        (502, None, True, False),
        (504, 1457, True, False),  # overload, gateway, failover
        (409, 1200, True, False),  # write-write conflict
        (500, 32, False, False),
        (500, 1521, False, False),
        (500, 4, False, False),  # deterministic: never repeated
        (408, 408, False, False),
        (429, 429, False, False),
        (400, 1501, False, False),
        (404, 1600, False, True),
        (409, 1601, False, True),  # cursor gone or busy
    ],
)
def test_only_transient_failures_are_retried(status, error_num, transient, cursor):
    err = _server_error(status, error_num)
    assert is_transient(err) is transient
    assert is_cursor_retryable(err) is cursor
    calls = []

    def fails():
        calls.append(1)
        raise err

    # given up on: named and wrapped; not retried: raised as it came
    with pytest.raises(DatabaseError if transient else type(err)):
        RetryPolicy(attempts=3, backoff=0.0).call(fails, "probe")
    assert len(calls) == (4 if transient else 1)
    assert is_transient(ConnectionAbortedError("dropped")) and is_transient(TimeoutError())


def _double_settings(double, database="t", user=None, password=None) -> ArangoSettings:
    return ArangoSettings(
        url=double.url,
        database=database,
        username=user or double.username,
        password=password or double.password,
        http_retries=0,
    )


def test_hardened_server_connects_with_the_version_hidden(caplog):
    # --server.harden: /_api/version has no 'version' for a user who is not an admin (double only).
    with ArangoDouble({"root": "pw", "app": "pw"}, hardened=True) as double:
        double.create_database("t")
        db = connect(_double_settings(double, user="app", password="pw"))
        info = server_info(db)
        assert (info.version, info.role, info.legacy_cursors) == (None, "SINGLE", True)
        assert info.describe() == {"version": "hidden", "role": "SINGLE"}
        assert "does not tell this user its version" in caplog.text
        assert server_info(connect(_double_settings(double, user="root", password="pw"))).version == (3, 11)


def test_servers_older_than_38_are_refused():
    with ArangoDouble(version="3.7") as double:
        double.create_database("t")
        with pytest.raises(DatabaseError, match=r"^ArangoDB 3\.7\.99-double is too old: expected 3\.8 or later"):
            connect(_double_settings(double))


def test_a_database_the_user_may_not_see_is_named_as_such():
    with ArangoDouble({"root": "pw", "app": "pw"}, access={"app": ("t",)}) as double:
        double.create_database("t")
        double.create_database("other")
        assert connect(_double_settings(double, user="app", password="pw")).name == "t"
        for name in ("other", "missing"):
            with pytest.raises(AuthenticationError, match="wrong credentials or no access to this database"):
                connect(_double_settings(double, database=name, user="app", password="pw"))
