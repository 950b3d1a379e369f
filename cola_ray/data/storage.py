"""Local-or-S3 paths in one place: list, open, read, write.

Every other module names data by a URL string: a local path (``data/shards``,
``/abs/shard-000000.tar``, a glob ``data/*.tar``, ``file:///x``) or ``s3://bucket/key``.
S3 goes through boto3 with botocore's adaptive retries (throttling, 5xx and connection
errors are retried with backoff); permanent errors (403, 404) are turned at once into
``PermissionError`` / ``FileNotFoundError`` naming the object. Ray Data gets a
``pyarrow.fs`` filesystem for the same URL from :func:`pyarrow_filesystem`.

Credentials are never passed around or logged: boto3 and pyarrow read the standard AWS
environment variables / config files themselves. The endpoint comes from the argument,
else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, moto, other S3-compatible
stores)::

    for url in list_files("s3://bucket/shards"):      # sorted, full URLs
        with open_input(url) as f:                    # streaming, retried on resets
            ...
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import io
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

_GLOB_CHARS = "*?["
_PERMANENT_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_PERMANENT_DENIED = {"403", "AccessDenied", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId",
                     "SignatureDoesNotMatch"}


# ---- names ---------------------------------------------------------------------------

def is_s3(url: str) -> bool:
    """True for ``s3://bucket[/key]``."""
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b.tar`` -> ``("bucket", "a/b.tar")``; the key may be empty."""
    if not is_s3(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = str(url)[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URL without a bucket: {url!r}")
    return bucket, key


def join(url: str, name: str) -> str:
    """``join("s3://b/prefix", "manifest.json")`` -> ``"s3://b/prefix/manifest.json"``."""
    url = str(url)
    if is_s3(url):
        return url.rstrip("/") + "/" + name
    return os.path.join(_local(url), name)


def _local(url: str) -> str:
    url = str(url)
    return url[len("file://"):] if url.startswith("file://") else url


def _endpoint(endpoint_url: str) -> str:
    # boto3 reads AWS_ENDPOINT_URL itself, but we must know it too: it decides path-style
    # addressing here and endpoint_override for pyarrow, which does not read it everywhere.
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3", "") or os.environ.get("AWS_ENDPOINT_URL", "")


def _region(region: str) -> str:
    return region or os.environ.get("AWS_REGION", "") or os.environ.get("AWS_DEFAULT_REGION", "") or "us-east-1"


# ---- clients -------------------------------------------------------------------------

def s3_client(endpoint_url: str = "", region: str = "") -> Any:
    """A boto3 S3 client with adaptive retries (10 attempts).

    Endpoint: the argument, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS.
    Region: the argument, else ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else us-east-1.
    With a custom endpoint, path-style addressing (``host/bucket/key``): MinIO and moto
    do not resolve ``bucket.host`` names.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    endpoint = _endpoint(endpoint_url)
    config = BotoConfig(
        retries={"mode": "adaptive", "max_attempts": 10},
        s3={"addressing_style": "path"} if endpoint else {},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint or None, region_name=_region(region), config=config
    )


@functools.lru_cache(maxsize=8)
def _cached_client(endpoint: str, region: str, pid: int, identity: str) -> Any:
    # Clients are thread-safe but not fork-safe: the pid in the key gives each forked
    # process (Ray worker) its own. Creating one costs tens of ms, too much per file.
    del pid, identity
    return s3_client(endpoint, region)


def _client(endpoint_url: str, region: str) -> Any:
    # A digest of the credential env vars (never the values) keys the cache, so that
    # changed credentials get a fresh client instead of the old one's.
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    identity = hashlib.sha256("\0".join(os.environ.get(n, "") for n in names).encode()).hexdigest()
    return _cached_client(_endpoint(endpoint_url), _region(region), os.getpid(), identity)


def pyarrow_filesystem(url: str, endpoint_url: str = "", region: str = "") -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path)`` for ``url``: what Ray Data reads shards through.

    S3: ``S3FileSystem`` with the same endpoint/region rules as :func:`s3_client` and
    AWS-standard retries (10 attempts); the path is ``bucket/key``. Credentials are left
    to pyarrow (AWS env vars, config files, instance metadata). Local: ``LocalFileSystem``
    and an absolute path.
    """
    import pyarrow.fs as pafs

    if not is_s3(url):
        return pafs.LocalFileSystem(), os.path.abspath(_local(url))
    bucket, key = split_s3(url)
    kwargs: dict[str, Any] = {
        "region": _region(region),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=10),
    }
    endpoint = _endpoint(endpoint_url)
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else "https://" + endpoint)
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


# ---- errors --------------------------------------------------------------------------

def _s3_error(err: Exception, url: str) -> Exception:
    """A botocore ClientError -> an OSError naming ``url``; 403/404 are permanent."""
    response = getattr(err, "response", {}) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    if code in _PERMANENT_NOT_FOUND or status == "404":
        what = "bucket" if code == "NoSuchBucket" else "object"
        return FileNotFoundError(f"S3 {what} not found: {url}")
    if code in _PERMANENT_DENIED or status == "403":
        return PermissionError(f"S3 access denied ({code or status}) to {url}")
    return OSError(f"S3 error {code or status} on {url}: {err}")


# ---- listing -------------------------------------------------------------------------

def list_sizes(url: str, suffix: str = ".tar", endpoint_url: str = "", region: str = "") -> dict[str, int]:
    """``{full_url: size_in_bytes}`` of the files :func:`list_files` would return."""
    url = str(url)
    if is_s3(url):
        found = _list_s3(url, suffix, endpoint_url, region)
    else:
        found = _list_local(_local(url), suffix)
    if not found:
        raise FileNotFoundError(f"no files ending in {suffix!r} at {url}")
    return dict(sorted(found.items()))


def list_files(url: str, suffix: str = ".tar", endpoint_url: str = "", region: str = "") -> list[str]:
    """Sorted full URLs of the files at ``url`` ending in ``suffix``.

    ``url`` is a folder (searched recursively), a local glob, a single file (returned
    whatever its suffix), ``s3://bucket``, ``s3://bucket/prefix`` (a "folder") or
    ``s3://bucket/key``. Nothing found (missing folder, bucket, prefix) ->
    ``FileNotFoundError`` naming ``url``.
    """
    return list(list_sizes(url, suffix, endpoint_url, region))


def _list_local(path: str, suffix: str) -> dict[str, int]:
    if any(c in path for c in _GLOB_CHARS):
        hits = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p) and p.endswith(suffix)]
        return {os.path.abspath(p): os.path.getsize(p) for p in hits}
    if os.path.isfile(path):
        return {os.path.abspath(path): os.path.getsize(path)}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such file or folder: {path}")
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            if name.endswith(suffix):
                full = os.path.abspath(os.path.join(root, name))
                out[full] = os.path.getsize(full)
    return out


def _list_s3(url: str, suffix: str, endpoint_url: str, region: str) -> dict[str, int]:
    from botocore.exceptions import ClientError

    bucket, key = split_s3(url)
    pattern = None
    if any(c in key for c in _GLOB_CHARS):
        pattern = key
        prefix = key[: min(key.index(c) for c in _GLOB_CHARS if c in key)]
    else:
        prefix = key
    folder = key.rstrip("/") + "/" if key else ""
    out = {}
    try:
        pages = _client(endpoint_url, region).get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"]
                if pattern is not None:
                    keep = fnmatch.fnmatchcase(name, pattern) and name.endswith(suffix)
                else:
                    # "prefix" means a folder or one exact object, never "prefix2/...".
                    keep = name == key or (name.startswith(folder) and name.endswith(suffix))
                if keep:
                    out[f"s3://{bucket}/{name}"] = int(obj["Size"])
    except ClientError as e:
        raise _s3_error(e, url) from e
    return out


# ---- reading -------------------------------------------------------------------------

def exists(url: str, endpoint_url: str = "", region: str = "") -> bool:
    """Whether the file / object exists (403 raises ``PermissionError``, not False)."""
    return file_size(url, endpoint_url, region) is not None


def file_size(url: str, endpoint_url: str = "", region: str = "") -> int | None:
    """Size in bytes, or None if there is no such file / object."""
    url = str(url)
    if not is_s3(url):
        path = _local(url)
        return os.path.getsize(path) if os.path.isfile(path) else None
    from botocore.exceptions import ClientError

    bucket, key = split_s3(url)
    try:
        return int(_client(endpoint_url, region).head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as e:
        err = _s3_error(e, url)
        if isinstance(err, FileNotFoundError):
            return None
        raise err from e


def file_stamp(url: str, endpoint_url: str = "", region: str = "") -> str | None:
    """A string that changes when the file / object changes (local: mtime and size; S3:
    ETag and size), or None if there is none. For caches of things parsed from a file."""
    url = str(url)
    if not is_s3(url):
        try:
            st = os.stat(_local(url))
        except FileNotFoundError:
            return None
        return f"{st.st_mtime_ns}:{st.st_size}"
    from botocore.exceptions import ClientError

    bucket, key = split_s3(url)
    try:
        head = _client(endpoint_url, region).head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        err = _s3_error(e, url)
        if isinstance(err, FileNotFoundError):
            return None
        raise err from e
    return f"{head.get('ETag', '')}:{head['ContentLength']}"


def stream_size(stream: IO[bytes]) -> int | None:
    """The total size of a stream from :func:`open_input` if known without reading it
    (a local regular file; an S3 object: the Content-Length of its GET), else None."""
    raw = getattr(stream, "raw", stream)
    if isinstance(raw, _S3Reader):
        return raw.size
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def open_input(url: str, endpoint_url: str = "", region: str = "") -> IO[bytes]:
    """A readable binary stream over ``url``; S3 objects are streamed, never read whole.

    S3 reads that break mid-stream (connection reset, timeout) resume where they stopped
    with a ranged GET pinned to the object's ETag, so a replaced object is never spliced.
    """
    url = str(url)
    if not is_s3(url):
        return open(_local(url), "rb")
    bucket, key = split_s3(url)
    raw = _S3Reader(_client(endpoint_url, region), bucket, key, url)
    return io.BufferedReader(raw, buffer_size=1 << 20)


def read_bytes(url: str, endpoint_url: str = "", region: str = "") -> bytes:
    """The whole file / object (for small things: manifests, single clips)."""
    with open_input(url, endpoint_url, region) as f:
        return f.read()


class _S3Reader(io.RawIOBase):
    """Sequential reader of one S3 object that survives broken connections."""

    def __init__(self, client: Any, bucket: str, key: str, url: str, attempts: int = 6):
        self._client, self._bucket, self._key, self._url = client, bucket, key, url
        self._attempts = attempts
        self._pos = 0
        self._etag = ""
        self._size = 0
        self._body = self._get()

    def _get(self) -> Any:
        from botocore.exceptions import ClientError

        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if self._pos:
            kwargs["Range"] = f"bytes={self._pos}-"
            kwargs["IfMatch"] = self._etag
        try:
            resp = self._client.get_object(**kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412"):
                raise OSError(f"S3 object changed while being read: {self._url}") from e
            raise _s3_error(e, self._url) from e
        self._etag = resp.get("ETag", "")
        if not self._pos:
            self._size = int(resp.get("ContentLength", 0))
        return resp["Body"]

    @property
    def size(self) -> int:
        """The object's size in bytes (its Content-Length)."""
        return self._size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        if self._pos >= self._size:
            return 0
        for attempt in range(self._attempts):
            try:
                data = self._body.read(len(buffer))
                break
            except (BotoCoreError, HTTPError, OSError) as e:
                if attempt == self._attempts - 1:
                    raise OSError(f"reading {self._url} failed at byte {self._pos}: {e}") from e
                time.sleep(min(0.2 * 2**attempt, 5.0))
                try:
                    self._body.close()
                except Exception:  # the old connection is broken anyway
                    pass
                self._body = self._get()
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._body.close()
            finally:
                super().close()


# ---- writing -------------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes(url: str, data: bytes, endpoint_url: str = "", region: str = "") -> None:
    """Write a whole file / object; local writes go to a temp file then ``os.replace``."""
    url = str(url)
    if is_s3(url):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(url)
        try:
            _client(endpoint_url, region).put_object(Bucket=bucket, Key=key, Body=data)
        except ClientError as e:
            raise _s3_error(e, url) from e
        return
    path = Path(_local(url))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the new one, never half of it
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def upload_file(local_path: str | Path, url: str, endpoint_url: str = "", region: str = "") -> None:
    """Copy a finished local file to ``url`` (S3 multipart for large files; local atomic)."""
    url = str(url)
    if is_s3(url):
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError

        bucket, key = split_s3(url)
        try:
            _client(endpoint_url, region).upload_file(str(local_path), bucket, key)
        except ClientError as e:
            raise _s3_error(e, url) from e
        except S3UploadFailedError as e:
            raise OSError(f"upload to {url} failed: {e}") from e
        return
    dest = Path(_local(url))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if Path(local_path).resolve() == dest.resolve():
        return
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
