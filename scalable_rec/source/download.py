"""Fetching MovieLens into a cache directory, checksummed, written atomically."""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path

from scalable_rec.atomic import sha256_file
from scalable_rec.errors import DownloadError

log = logging.getLogger(__name__)

BASE_URL = "https://files.grouplens.org/datasets/movielens"
# (bytes, sha256) of each archive, pinned here instead of trusting a checksum served by the
# same host as the archive. Values as published in TensorFlow Datasets'
# tensorflow_datasets/url_checksums/movielens.txt (ml-latest-small: the 2018-09 release that
# files.grouplens.org serves now). A name not listed is refused: download it yourself and
# pass --data.
PINNED_ARCHIVES: dict[str, tuple[int, str]] = {
    "ml-latest-small": (978202, "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436"),
    "ml-100k": (4924029, "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"),
    "ml-1m": (5917549, "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"),
    "ml-20m": (198702078, "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3"),
    "ml-25m": (261978986, "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa"),
}
# sha256 of ratings.csv in releases we know (logged after unpacking, for the record).
KNOWN_RATINGS_SHA256 = {
    "b4239649fbf90ebf405c56c3ae1d929d9e7c86fc1a3a80cbef1c884df593ef73": "ml-latest-small 2016-10",
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SCALABLE_REC_CACHE", Path.home() / ".cache" / "scalable-rec"))


def fetch_movielens(
    name: str = "ml-latest-small",
    cache_dir: str | os.PathLike | None = None,
    base_url: str = BASE_URL,
    timeout: float = 60.0,
    pinned: tuple[int, str] | None = None,
) -> Path:
    """Returns a local MovieLens directory, downloading ``<name>.zip`` once if needed.

    The zip's size and sha256 must match the values pinned in ``PINNED_ARCHIVES`` (never a
    checksum fetched from the download host, which an attacker controlling it would
    replace too); it is unpacked to
    ``<cache>/<name>.incomplete`` and renamed when complete, so an interrupted download is
    never mistaken for data.

    Args:
        name: Data set name on files.grouplens.org (default ``ml-latest-small``).
        cache_dir: Where data sets live (default ``$SCALABLE_REC_CACHE`` or
            ``~/.cache/scalable-rec``), under ``data/``.
        base_url: Mirror to download from.
        timeout: Socket timeout in seconds.
        pinned: ``(bytes, sha256)`` to check instead of ``PINNED_ARCHIVES[name]``.
    """
    root = Path(cache_dir or default_cache_dir()) / "data"
    final = root / name
    if (final / "ratings.csv").is_file():
        return final
    pinned = pinned or PINNED_ARCHIVES.get(name)
    if pinned is None:
        raise DownloadError(
            f"No pinned sha256 for '{name}' (known: {sorted(PINNED_ARCHIVES)}); download it "
            "yourself and pass --data DIR (a folder with ratings.csv and movies.csv)"
        )
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
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(
            f"Could not download {url} ({err}). Pass --data DIR pointing at a local copy of "
            f"{name} (a folder with ratings.csv and movies.csv)"
        ) from err
    size, digest = archive.stat().st_size, sha256_file(archive)
    if (size, digest) != tuple(pinned):
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(
            f"Checksum mismatch for {url}: got {size} bytes with sha256 {digest}, expected "
            f"{pinned[0]} bytes with sha256 {pinned[1]} (pinned in scalable_rec.source.download)"
        )
    with zipfile.ZipFile(archive) as z:
        for member in z.namelist():
            target = (tmp / member).resolve()
            if not str(target).startswith(str(tmp.resolve())):
                raise DownloadError(f"Refusing zip member outside the target folder: {member}")
        z.extractall(tmp)
    inner = tmp / name
    if not (inner / "ratings.csv").is_file():
        raise DownloadError(f"{url} did not contain {name}/ratings.csv")
    digest = sha256_file(inner / "ratings.csv")
    log.info("ratings.csv sha256 %s (%s)", digest, KNOWN_RATINGS_SHA256.get(digest, "release not pinned"))
    os.replace(inner, final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final
