"""One URI-based API over object storage (`s3://bucket/key`) and local files
(`file:///path` or a plain path).

Every job and service reads and writes through these functions, so a pipeline
never cares whether its data sits on a laptop or in a bucket. S3 settings come
from the standard AWS environment variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`), which
`kosmos-g local env` exports for the local stack.

Guarantees:
- writes are atomic: S3 objects appear only once their upload completed; local
  files are written to a temporary sibling and renamed into place;
- transient S3 errors (throttling, 5xx, dropped connections) are retried with
  exponential backoff by botocore's "standard" retry mode;
- a missing object raises `StorageNotFound`, naming the URI.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator
from urllib.parse import urlparse

S3_RETRY_ATTEMPTS = 8
# pyarrow's client (Ray Data, Ray Train's controller) backs off faster than boto3: 8 attempts
# against a refused connection give up after ~40 s, shorter than a loaded SeaweedFS restart, and a
# failed checkpoint-state write fails the whole Train run. 12 attempts wait ~2.3 min.
PYARROW_S3_RETRY_ATTEMPTS = 12
# boto3 switches to multipart uploads above this size; kept small enough that
# tests exercise the multipart path with a few megabytes.
MULTIPART_THRESHOLD = 8 * 1024 * 1024


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The object or file at a URI does not exist."""


@dataclass(frozen=True)
class Location:
    """A parsed URI: `scheme` is "s3" or "file"; `path` is the key or local path."""

    scheme: str
    bucket: str
    path: str

    @property
    def uri(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}"
        return self.path


def parse(uri: str | os.PathLike) -> Location:
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"s3 URI without a bucket: {text!r}")
        return Location("s3", parsed.netloc, parsed.path.lstrip("/"))
    if parsed.scheme == "file":
        return Location("file", "", os.path.abspath(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise StorageError(f"unsupported storage scheme {parsed.scheme!r} in {text!r}")
    return Location("file", "", os.path.abspath(text))


def default_root(*parts: str) -> str:
    """`$KOSMOS_STORAGE_ROOT` (the local stack exports it), else `.kosmos/storage` under the
    current directory, with `parts` joined on."""
    root = os.environ.get("KOSMOS_STORAGE_ROOT") or os.path.abspath(".kosmos/storage")
    return join(root, *parts) if parts else root


def join(base: str, *parts: str) -> str:
    """Join URI path parts with '/' (plain paths use the OS separator)."""
    location = parse(base)
    if location.scheme == "s3":
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(base, *parts)


# --------------------------------------------------------------------------- S3


@functools.lru_cache(maxsize=8)
def _s3_client_for(endpoint: str | None, access_key: str | None, secret_key: str | None, region: str | None):
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": S3_RETRY_ATTEMPTS, "mode": "standard"},
        s3={"addressing_style": "path"},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint or None, region_name=region or "us-east-1", config=config,
        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
    )


def s3_client():
    """A boto3 S3 client for the current environment (cached per endpoint/key)."""
    return _s3_client_for(
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
    )


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)


def _is_missing(error: Exception) -> bool:
    code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
    return code in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


@contextlib.contextmanager
def _s3_errors(uri: str):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as error:
        if _is_missing(error):
            raise StorageNotFound(f"no such object: {uri}") from error
        raise StorageError(f"S3 request for {uri} failed: {error}") from error
    except BotoCoreError as error:
        raise StorageError(f"S3 request for {uri} failed: {error}") from error


# ------------------------------------------------------------------ public API


def read_bytes(uri: str | os.PathLike) -> bytes:
    with open_read(uri) as stream:
        return stream.read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    with open_write(uri) as stream:
        stream.write(data)


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str | os.PathLike, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


@contextlib.contextmanager
def open_read(uri: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary stream over the object; S3 bodies are streamed, not buffered."""
    location = parse(uri)
    if location.scheme == "s3":
        with _s3_errors(location.uri):
            body = s3_client().get_object(Bucket=location.bucket, Key=location.path)["Body"]
        try:
            yield body
        finally:
            body.close()
        return
    try:
        stream = open(location.path, "rb")
    except FileNotFoundError as error:
        raise StorageNotFound(f"no such file: {location.path}") from error
    with stream:
        yield stream


@contextlib.contextmanager
def open_write(uri: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary stream whose content becomes visible at the URI only when the
    block exits without an error; on error nothing is written."""
    location = parse(uri)
    if location.scheme == "s3":
        with tempfile.TemporaryFile() as spool:
            yield spool
            spool.seek(0)
            with _s3_errors(location.uri):
                s3_client().upload_fileobj(spool, location.bucket, location.path, Config=_transfer_config())
        return
    target = Path(location.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def exists(uri: str | os.PathLike) -> bool:
    location = parse(uri)
    if location.scheme == "s3":
        try:
            with _s3_errors(location.uri):
                s3_client().head_object(Bucket=location.bucket, Key=location.path)
            return True
        except StorageNotFound:
            return False
    return os.path.exists(location.path)


def delete(uri: str | os.PathLike, missing_ok: bool = True) -> None:
    location = parse(uri)
    if not missing_ok and not exists(uri):
        raise StorageNotFound(f"no such object: {location.uri}")
    if location.scheme == "s3":
        with _s3_errors(location.uri):
            s3_client().delete_object(Bucket=location.bucket, Key=location.path)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(location.path)


def delete_prefix(prefix: str | os.PathLike) -> int:
    """Delete every object under a prefix (or a local directory tree)."""
    uris = list_uris(prefix)
    location = parse(prefix)
    if location.scheme == "file":
        shutil.rmtree(location.path, ignore_errors=True)
        return len(uris)
    for uri in uris:
        delete(uri)
    return len(uris)


def _s3_objects(location: Location, prefix: str) -> list[dict]:
    """The listing entries (Key, Size, ETag, …) of every object under `prefix` in `location`'s
    bucket, directory-marker objects (keys ending in '/') left out."""
    paginator = s3_client().get_paginator("list_objects_v2")
    with _s3_errors(location.uri):
        return [item for page in paginator.paginate(Bucket=location.bucket, Prefix=prefix)
                for item in page.get("Contents", []) if not item["Key"].endswith("/")]


def list_uris(prefix: str | os.PathLike) -> list[str]:
    """Every object under a prefix, recursively, as full URIs in sorted order.
    Empty directory-marker objects (keys ending in '/') are left out."""
    location = parse(prefix)
    if location.scheme == "s3":
        return sorted(f"s3://{location.bucket}/{item['Key']}" for item in _s3_objects(location, location.path))
    root = Path(location.path)
    if root.is_file():
        return [str(root)]
    if not root.exists():
        # A prefix that is not a directory matches files that start with it.
        parent = root.parent
        if not parent.is_dir():
            return []
        return sorted(str(p) for p in parent.iterdir() if p.name.startswith(root.name) and p.is_file())
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an s3:// URI if it does not exist yet."""
    location = parse(uri)
    if location.scheme != "s3":
        return
    client = s3_client()
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=location.bucket)
    except ClientError:
        with _s3_errors(uri):
            client.create_bucket(Bucket=location.bucket)


def upload_dir(local_dir: str | os.PathLike, uri: str) -> list[str]:
    """Copy a local directory tree under a URI prefix; returns the written URIs."""
    written = []
    root = Path(local_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        target = join(uri, path.relative_to(root).as_posix())
        with open(path, "rb") as source, open_write(target) as sink:
            shutil.copyfileobj(source, sink, length=1024 * 1024)
        written.append(target)
    return written


def download_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy every object under a URI prefix into a local directory."""
    root = Path(local_dir)
    location = parse(uri)
    prefix_len = len(location.path.rstrip("/")) + 1
    uris = list_uris(uri.rstrip("/") + "/") if location.scheme == "s3" else list_uris(uri)
    if not uris:
        raise StorageNotFound(f"nothing stored under {location.uri}")
    for source_uri in uris:
        relative = parse(source_uri).path[prefix_len:]
        with open_read(source_uri) as source, open_write(root / relative) as sink:
            shutil.copyfileobj(source, sink, length=1024 * 1024)
    return root


def _stored_fingerprint(location: Location, tree: bool) -> str:
    """A short hash of what is stored at an s3 `location` now: each object's key, size and ETag
    (the tree under it, or the one object). Cached copies are keyed by it, so bytes written
    again under a path an earlier stack used are fetched again instead of served stale."""
    if tree:
        entries = [(item["Key"], item["Size"], item.get("ETag", ""))
                   for item in _s3_objects(location, location.path.rstrip("/") + "/")]
    else:
        with _s3_errors(location.uri):
            head = s3_client().head_object(Bucket=location.bucket, Key=location.path)
        entries = [(location.path, head["ContentLength"], head.get("ETag", ""))]
    if not entries:
        raise StorageNotFound(f"nothing stored under {location.uri}")
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    """Where fetched copies are cached on this machine: `$KOSMOS_CACHE_DIR`, else ~/.cache/kosmos-g."""
    return Path(os.environ.get("KOSMOS_CACHE_DIR", Path.home() / ".cache" / "kosmos-g"))


def _cache_target(location: Location, cache_root: str | os.PathLike | None, tree: bool) -> Path:
    """Where the tree or object at `location` is cached under `cache_root`: a folder named by its
    path and `_stored_fingerprint`; a single object keeps its file name inside it."""
    cache = Path(cache_root) if cache_root else default_cache_root()
    path = location.path.strip("/")
    folder = cache / location.bucket / f"{path}@{_stored_fingerprint(location, tree)}"
    return folder if tree else folder / Path(path).name


def local_dir(uri: str, cache_root: str | os.PathLike | None = None) -> Path:
    """A local directory holding the tree at `uri`: the path itself for local
    URIs, else a cache copy of what is stored there now (reused while the listing is
    unchanged). Models only ever see local directories; this is where `s3://` weights become one."""
    location = parse(uri)
    if location.scheme == "file":
        if not os.path.isdir(location.path):
            raise StorageNotFound(f"no such directory: {location.path}")
        return Path(location.path)
    target = _cache_target(location, cache_root, tree=True)
    return fill_once(target, lambda staging: download_dir(uri, staging), note=location.uri)


def fill_once(target: Path, fill: Callable[[Path], object], note: str = "") -> Path:
    """The cache folder `target`, filled by `fill(folder)` unless a complete copy is there.

    It is filled in a folder beside it, marked `.complete` and renamed into place, so a crash never
    leaves a half-filled folder that passes for complete, and of two processes filling it at once
    (two Train workers on one node) the first complete copy stays."""
    marker = target / ".complete"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        fill(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / ".complete").write_text(note)
    if target.exists() and not marker.exists():
        shutil.rmtree(target)  # never marked complete: a copy made before the marker existed
    try:
        os.replace(staging, target)
    except OSError:
        # Another process renamed its complete copy there first and may be reading it now: keep
        # that one. Replacing it deleted files under a reader (`torch.load`: "PytorchStreamReader
        # failed reading file data/95").
        shutil.rmtree(staging, ignore_errors=True)
        if not marker.exists():
            raise
    return target


def local_file(uri: str, cache_root: str | os.PathLike | None = None) -> Path:
    """A local path of the single file at `uri`: itself when local, else a cached download of
    what is stored there now (written beside and renamed, so a partial download never passes
    for the file)."""
    location = parse(uri)
    if location.scheme == "file":
        if not os.path.isfile(location.path):
            raise StorageNotFound(f"no such file: {location.path}")
        return Path(location.path)
    target = _cache_target(location, cache_root, tree=False)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkstemp(dir=target.parent, prefix=".download-")[1])
    with open_read(uri) as source, open(partial, "wb") as sink:
        shutil.copyfileobj(source, sink, length=1024 * 1024)
    os.replace(partial, target)
    return target


def pyarrow_filesystem(uri: str):
    """(pyarrow FileSystem, path) for Ray Data readers and writers.

    pyarrow ignores AWS_ENDPOINT_URL, so the endpoint is passed explicitly."""
    import pyarrow.fs as pafs

    if parse(uri).scheme == "file":
        return pafs.LocalFileSystem(), pyarrow_path(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=PYARROW_S3_RETRY_ATTEMPTS),
    }
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        options["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc or parsed.path
        options["scheme"] = parsed.scheme or "http"
    return pafs.S3FileSystem(**options), pyarrow_path(uri)


def pyarrow_path(uri: str) -> str:
    """The path of `uri` on its `pyarrow_filesystem` (without building a filesystem: many paths
    share one)."""
    location = parse(uri)
    return location.path if location.scheme == "file" else f"{location.bucket}/{location.path}"
