"""Object storage access: S3 (s3://bucket/prefix) or a local directory, behind one small interface.

Artifacts code (trainer/artifacts.py) speaks to a `Store` and never to boto3,
so that every stage runs the same against S3, an S3-compatible server, or a
plain directory (local runs without an endpoint).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Protocol


class StorageError(RuntimeError):
    """A URI that cannot be read or written; the message names the URI."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"s3 URI without a bucket: {uri}")
    return bucket, key


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def s3_client(endpoint_url: Optional[str] = None, region: Optional[str] = None, max_pool: int = 16):
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    cfg = Config(
        retries={"max_attempts": 8, "mode": "adaptive"},
        max_pool_connections=max_pool,
        # S3-compatible servers (MinIO, Ceph, moto) may reject the default CRC checksums of boto3 >= 1.36.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # Custom endpoints rarely have wildcard DNS for virtual-hosted buckets.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=cfg,
    )


def transfer_config(max_concurrency: int = 8):
    from boto3.s3.transfer import TransferConfig

    # Multipart in 16 MiB parts: large shards are fetched by several threads, and a
    # multipart upload only becomes visible on Complete (never half an object).
    return TransferConfig(
        multipart_threshold=16 * 1024 * 1024,
        multipart_chunksize=16 * 1024 * 1024,
        max_concurrency=max_concurrency,
        use_threads=True,
    )


# Objects larger than this are downloaded in ranges of this size, resumably.
RANGE_BYTES = 16 * 1024 * 1024


def _ranged_download(get_range, local: Path, size: int, etag: str, workers: int) -> None:
    """Fill `.<name>.part` range by range (`get_range(start, end) -> bytes`), recording
    finished range indices in `.<name>.ranges`; rename to `local` when all are in."""
    import fcntl
    import json
    import threading

    part = local.with_name(f".{local.name}.part")
    ledger = local.with_name(f".{local.name}.ranges")
    n = (size + RANGE_BYTES - 1) // RANGE_BYTES
    # Not append mode: Linux pwrite() ignores the offset on an O_APPEND file.
    with os.fdopen(os.open(part, os.O_RDWR | os.O_CREAT, 0o644), "r+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # held until the with block ends
        if local.exists() and local.stat().st_size == size:
            return  # another process finished it while this one waited
        done: set[int] = set()
        try:
            state = json.loads(ledger.read_text())
            if state.get("etag") == etag and state.get("size") == size and os.fstat(f.fileno()).st_size == size:
                done = {int(i) for i in state.get("done", [])}
        except (OSError, ValueError):
            pass
        if not done:
            f.truncate(size)
        lock = threading.Lock()

        def one(i: int) -> None:
            start = i * RANGE_BYTES
            end = min(size, start + RANGE_BYTES)
            data = get_range(start, end)
            if len(data) != end - start:
                raise StorageError(f"range {start}-{end} of {local.name}: got {len(data)} bytes, expected {end - start}")
            os.pwrite(f.fileno(), data, start)
            with lock:
                done.add(i)
                tmp = ledger.with_name(ledger.name + ".tmp")
                tmp.write_text(json.dumps({"etag": etag, "size": size, "done": sorted(done)}))
                os.replace(tmp, ledger)  # a ledger entry is written only after its bytes

        missing = [i for i in range(n) if i not in done]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(one, missing))
        f.flush()
        os.fsync(f.fileno())
        os.replace(part, local)
        ledger.unlink(missing_ok=True)


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store root
    size: int
    etag: str


class Store(Protocol):
    uri: str

    def put_file(self, local: Path, key: str) -> None: ...
    def put_bytes(self, data: bytes, key: str) -> None: ...
    def get_bytes(self, key: str) -> Optional[bytes]: ...
    def get_file(self, key: str, local: Path, size: Optional[int] = None, etag: Optional[str] = None) -> None: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...


class LocalStore:
    """A directory used like a bucket; writes go through a temp file + rename."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def put_file(self, local: Path, key: str) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.part")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)

    def put_bytes(self, data: bytes, key: str) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.part")
        tmp.write_bytes(data)
        os.replace(tmp, dst)

    def get_bytes(self, key: str) -> Optional[bytes]:
        p = self._path(key)
        return p.read_bytes() if p.is_file() else None

    def get_file(self, key: str, local: Path, size: Optional[int] = None, etag: Optional[str] = None) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), local)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            st = base.stat()
            return [ObjectInfo(prefix, st.st_size, f"{st.st_mtime_ns}-{st.st_size}")]
        if not base.is_dir():
            return []
        out = []
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.endswith(".part"):
                st = p.stat()
                out.append(ObjectInfo(p.relative_to(self.root).as_posix(), st.st_size, f"{st.st_mtime_ns}-{st.st_size}"))
        return out

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Like S3, a "directory" exists only while it holds objects.
        for parent in path.parents:
            if parent == self.root or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()


class S3Store:
    def __init__(self, uri: str, client=None, max_concurrency: int = 8):
        self.bucket, self.prefix = split_s3(uri)
        self.uri = uri
        self.client = client or s3_client()
        self.transfer = transfer_config(max_concurrency)

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def put_file(self, local: Path, key: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(key), Config=self.transfer)

    def put_bytes(self, data: bytes, key: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> Optional[bytes]:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        except Exception as e:  # botocore ClientError 404 on some servers
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise

    def get_file(self, key: str, local: Path, size: Optional[int] = None, etag: Optional[str] = None) -> None:
        """Download to `local` (by rename, so a present file is complete).

        With the object's size and ETag (from `list`), a large object is fetched
        in RANGE_BYTES ranges by several threads into `.<name>.part`; the ranges
        done so far are recorded beside it, so a download interrupted by a crash,
        a kill or a lost connection resumes where it stopped instead of starting
        the file again. Every range is requested with If-Match on the ETag: a
        version that changes mid-download fails loudly, never mixes bytes.
        An exclusive lock on the part file keeps two processes sharing a cache
        from writing the same file; the second finds it done.
        """
        local.parent.mkdir(parents=True, exist_ok=True)
        if size is None or etag is None or size <= RANGE_BYTES:
            tmp = local.with_name(f".{local.name}.{os.getpid()}.part")  # processes sharing a cache never collide
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self.transfer)
            os.replace(tmp, local)
            return
        _ranged_download(lambda start, end: self._get_range(key, start, end, etag), local, size, etag,
                         self.transfer.max_concurrency)

    def _get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        r = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end - 1}",
                                   IfMatch=f'"{etag}"')
        return r["Body"].read()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = self._key(prefix)
        if prefix and not full.endswith("/"):
            # A "directory" prefix: list its contents, not siblings sharing the string prefix.
            single = self._list_raw(full)
            exact = [o for o in single if o[0] == full]
            if exact:
                return [self._info(*exact[0])]
            full += "/"
        elif not prefix and full:
            full += "/"
        return [self._info(*o) for o in self._list_raw(full)]

    def _list_raw(self, full_prefix: str) -> Iterator[tuple[str, int, str]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix)
        out = []
        for page in pages:
            for o in page.get("Contents", []):
                out.append((o["Key"], o["Size"], o["ETag"].strip('"')))
        return out

    def _info(self, key: str, size: int, etag: str) -> ObjectInfo:
        rel = key[len(self.prefix) :].lstrip("/") if self.prefix else key
        return ObjectInfo(rel, size, etag)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def open_store(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None, max_concurrency: int = 8) -> Store:
    if is_s3(uri):
        return S3Store(uri, s3_client(endpoint_url, region, max_pool=max(16, max_concurrency * 2)), max_concurrency)
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme (use s3:// or a local path): {uri}")
    return LocalStore(uri)


def cache_root(explicit: Optional[str] = None) -> Path:
    root = explicit or os.environ.get("KUBETUNE_CACHE_DIR") or os.path.join(Path.home(), ".cache", "kubetune")
    return Path(root)


def _cache_dir_for(uri: str, objects: list[ObjectInfo], root: Path) -> Path:
    # The key includes every object's ETag: a changed object in S3 is a new cache entry.
    h = hashlib.sha256(uri.encode())
    for o in sorted(objects, key=lambda o: o.key):
        h.update(f"\0{o.key}\0{o.etag}".encode())
    return root / h.hexdigest()[:24]


def fetch(uri: str, *, endpoint_url: Optional[str] = None, region: Optional[str] = None,
          cache_dir: Optional[str] = None, max_concurrency: int = 8) -> Path:
    """Make `uri` (a file or a prefix) available locally; return the local file or directory.

    Local paths are returned as they are. S3 objects are downloaded in parallel
    (files concurrently, big files in multipart ranges) into a cache keyed by URI
    and ETags. An interrupted download resumes: files already fetched with the
    same ETag are kept, and a large file continues from its last finished
    range (`S3Store.get_file`).
    """
    if not is_s3(uri):
        p = Path(uri)
        if not p.exists():
            raise StorageError(f"path does not exist: {uri}")
        return p
    bucket, key = split_s3(uri)
    store = S3Store(f"s3://{bucket}", s3_client(endpoint_url, region, max_pool=max(16, max_concurrency * 2)), max_concurrency)
    objects = store.list(key)
    if not objects:
        raise StorageError(f"nothing found at {uri}")
    single_file = len(objects) == 1 and objects[0].key == key.rstrip("/") and not uri.endswith("/")
    target = _cache_dir_for(uri, objects, cache_root(cache_dir))
    done_marker = target / ".complete"
    base = key.rstrip("/") if single_file else key.rstrip("/") + "/" if key else ""
    if not done_marker.exists():
        target.mkdir(parents=True, exist_ok=True)

        def one(o: ObjectInfo) -> None:
            rel = Path(o.key).name if single_file else o.key[len(base) :]
            local = target / rel
            # The cache directory is keyed by every ETag and files land by rename,
            # so a present file of the right size is a complete copy of this version.
            if local.exists() and local.stat().st_size == o.size:
                return
            store.get_file(o.key, local, size=o.size, etag=o.etag)

        with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
            list(pool.map(one, [o for o in objects if not o.key.endswith("/")]))
        done_marker.write_text(uri)
    if single_file:
        return target / Path(objects[0].key).name
    return target
