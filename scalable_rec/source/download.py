"""Fetching MovieLens into a cache directory, checksummed, written atomically."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path

from scalable_rec.errors import DownloadError

log = logging.getLogger(__name__)

BASE_URL = "https://files.grouplens.org/datasets/movielens"
# sha256 of ratings.csv in releases we know; GroupLens republishes ml-latest-small, so a
# release not listed here is checked against the .md5 file GroupLens serves beside the zip.
KNOWN_RATINGS_SHA256 = {
    "b4239649fbf90ebf405c56c3ae1d929d9e7c86fc1a3a80cbef1c884df593ef73": "ml-latest-small 2016-10",
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SCALABLE_REC_CACHE", Path.home() / ".cache" / "scalable-rec"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def fetch_movielens(name: str = "ml-latest-small", cache_dir: str | os.PathLike | None = None,
                    base_url: str = BASE_URL, timeout: float = 60.0) -> Path:
    """Returns a local MovieLens directory, downloading ``<name>.zip`` once if needed.

    The zip's md5 must match GroupLens' published ``<name>.zip.md5``; it is unpacked to
    ``<cache>/<name>.incomplete`` and renamed when complete, so an interrupted download is
    never mistaken for data.

    Args:
        name: Data set name on files.grouplens.org (default ``ml-latest-small``).
        cache_dir: Where data sets live (default ``$SCALABLE_REC_CACHE`` or
            ``~/.cache/scalable-rec``), under ``data/``.
        base_url: Mirror to download from.
        timeout: Socket timeout in seconds.
    """
    root = Path(cache_dir or default_cache_dir()) / "data"
    final = root / name
    if (final / "ratings.csv").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{name}.incomplete"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    archive = tmp / f"{name}.zip"
    url = f"{base_url}/{name}.zip"
    log.info("downloading %s to %s", url, final)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(archive, "wb") as f:
            shutil.copyfileobj(r, f)
        with urllib.request.urlopen(f"{url}.md5", timeout=timeout) as r:
            expected_md5 = r.read().decode().split()[0].strip().lower()
    except OSError as err:
        raise DownloadError(
            f"Could not download {url} ({err}). Pass --data DIR pointing at a local copy of "
            f"{name} (a folder with ratings.csv and movies.csv)"
        ) from err
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    if md5 != expected_md5:
        raise DownloadError(f"Checksum mismatch for {url}: md5 {md5}, GroupLens publishes {expected_md5}")
    with zipfile.ZipFile(archive) as z:
        for member in z.namelist():
            target = (tmp / member).resolve()
            if not str(target).startswith(str(tmp.resolve())):
                raise DownloadError(f"Refusing zip member outside the target folder: {member}")
        z.extractall(tmp)
    inner = tmp / name
    if not (inner / "ratings.csv").is_file():
        raise DownloadError(f"{url} did not contain {name}/ratings.csv")
    digest = _sha256(inner / "ratings.csv")
    log.info("ratings.csv sha256 %s (%s)", digest, KNOWN_RATINGS_SHA256.get(digest, "release not pinned"))
    os.replace(inner, final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final
