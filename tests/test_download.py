"""fetch_movielens against a local HTTP server on 127.0.0.1 (no outside network)."""

import hashlib
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scalable_rec.errors import DownloadError
from scalable_rec.source.download import fetch_movielens


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()
    archive = root / "ml-latest-small.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ml-latest-small/ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.5,1\n")
        z.writestr("ml-latest-small/movies.csv", "movieId,title,genres\n1,A (1990),Drama\n")
    # A matching .md5 beside the archive: served by the same host, so it must not be trusted.
    (root / "ml-latest-small.zip.md5").write_text(
        hashlib.md5(archive.read_bytes()).hexdigest() + "  ml-latest-small.zip\n"
    )
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield (
        root,
        f"http://127.0.0.1:{server.server_address[1]}",
        (archive.stat().st_size, hashlib.sha256(archive.read_bytes()).hexdigest()),
    )
    server.shutdown()


def test_download_checks_pinned_sha256_and_caches(mirror, tmp_path):
    root, url, pinned = mirror
    path = fetch_movielens(cache_dir=tmp_path / "cache", base_url=url, pinned=pinned)
    assert (path / "ratings.csv").read_text().endswith("1,1,4.5,1\n")
    assert not list((tmp_path / "cache" / "data").glob("*.incomplete"))
    (root / "ml-latest-small.zip").unlink()  # second call must not download again
    assert fetch_movielens(cache_dir=tmp_path / "cache", base_url=url, pinned=pinned) == path


def test_checksum_from_the_download_host_is_not_trusted(mirror, tmp_path):
    """The mirror serves an archive and a matching .md5, but not the pinned sha256: refused."""
    root, url, _ = mirror
    with pytest.raises(DownloadError, match="Checksum mismatch.*sha256"):
        fetch_movielens(cache_dir=tmp_path / "cache", base_url=url)
    assert not (tmp_path / "cache" / "data" / "ml-latest-small").exists()
    assert not list((tmp_path / "cache" / "data").glob("*.incomplete"))


def test_unreachable_mirror_points_at_data_flag(tmp_path):
    with pytest.raises(DownloadError, match="--data DIR"):
        fetch_movielens(cache_dir=tmp_path / "cache", base_url="http://127.0.0.1:9", timeout=2)
