"""Connection settings and errors: env/file resolution, masked password, distinct failures.

Tests that only talk to a server run against the test double, or against the real server
named by ``SCALABLE_REC_ARANGO_URL``.
"""
import json
import logging
import socket

import pytest

from scalable_rec.connection import (
    ENV_DATABASE, ENV_PASSWORD, ENV_PASSWORD_FILE, ENV_URL, ENV_USER, ArangoConfig, ArangoSettings, RetryPolicy,
    connect, require_collection,
)
from scalable_rec.errors import (
    AuthenticationError, CollectionNotFoundError, ConfigError, DatabaseError, DatabaseNotFoundError,
    DatabaseUnreachableError,
)

SECRET = "s3cret-do-not-print"


def _settings(endpoint, **changes) -> ArangoSettings:
    values = dict(url=endpoint.url, database=endpoint.database, username=endpoint.username,
                  password=endpoint.password, http_retries=0)
    return ArangoSettings(**{**values, **changes})


def test_settings_from_environment_and_password_file(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text(SECRET + "\n")
    env = {ENV_URL: "https://db.example:8529", ENV_DATABASE: "movies", ENV_USER: "rec",
           ENV_PASSWORD_FILE: str(secret)}
    s = ArangoSettings.from_sources(environ=env)
    assert (s.url, s.database, s.username, s.password) == ("https://db.example:8529", "movies", "rec", SECRET)
    assert ArangoSettings.from_sources(environ={**env, ENV_PASSWORD: "direct"}).password == "direct"
    # flags win over the environment
    assert ArangoSettings.from_sources(environ=env, database="other").database == "other"


@pytest.mark.parametrize("kind", ["json", "ini"])
def test_settings_from_config_file(tmp_path, kind):
    path = tmp_path / f"arango.{kind}"
    if kind == "json":
        path.write_text(json.dumps({"arango": {"url": "http://h:1", "database": "d", "username": "u",
                                               "password": SECRET, "request_timeout": 5}}))
    else:
        path.write_text(f"[arango]\nurl = http://h:1\ndatabase = d\nusername = u\npassword = {SECRET}\n"
                        "request_timeout = 5\n")
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
    with pytest.raises(AuthenticationError, match=r"rejected the credentials for user '.*' .*HTTP 401") as err:
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
