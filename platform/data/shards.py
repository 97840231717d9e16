"""The shard format of the three training sources: Parquet files plus a manifest.

A shard set lives under one storage prefix (`s3://bucket/shards/captions`, or a local
directory):

    <prefix>/manifest.json        format, schema version, source, row counts per file
    <prefix>/part-00000.parquet   rows of one source, schema below
    <prefix>/part-00001.parquet   ...

Images are stored as encoded bytes (JPEG/PNG, anything PIL decodes) so a shard is as
small as the pictures themselves; columns that a stage does not need (e.g. the images
in stage 2) are never read. Why Parquet and not WebDataset tar: see docs/DATA.md.

Sources and their columns (all rows carry a stable `key`):
- captions:      caption, image, width, height
- compositional: caption, image, width, height, entities (list of structs: text, start,
                 end [character span in caption], box [x0, y0, x1, y1], area [mask
                 fraction], crop [with background], crop_nobg [background removed])
- editing:       input_caption, input_image, instruction, edited_image, edited_caption
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from kosmos_g.platform import storage

FORMAT = "kosmos-g-shards"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SOURCES = ("captions", "compositional", "editing")
# Parquet row groups are the unit a reader can skip or fetch alone; images make rows
# large, so groups stay small enough that a reader never holds much more than a batch.
ROW_GROUP_SIZE = 64

ENTITY = pa.struct([
    ("text", pa.string()),
    ("start", pa.int32()),
    ("end", pa.int32()),
    ("box", pa.list_(pa.int32(), 4)),
    ("area", pa.float32()),
    ("crop", pa.binary()),
    ("crop_nobg", pa.binary()),
])

SCHEMAS: dict[str, pa.Schema] = {
    "captions": pa.schema([
        ("key", pa.string()),
        ("caption", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]),
    "compositional": pa.schema([
        ("key", pa.string()),
        ("caption", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("entities", pa.list_(ENTITY)),
    ]),
    "editing": pa.schema([
        ("key", pa.string()),
        ("input_caption", pa.string()),
        ("input_image", pa.binary()),
        ("instruction", pa.string()),
        ("edited_image", pa.binary()),
        ("edited_caption", pa.string()),
    ]),
}


class ShardError(ValueError):
    """A shard set is missing, malformed or of an unsupported schema version."""


def schema(source: str) -> pa.Schema:
    if source not in SCHEMAS:
        raise ShardError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    return SCHEMAS[source]


def to_table(source: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) as an Arrow table of the source's schema; wrong types raise."""
    return pa.Table.from_pylist(rows, schema=schema(source))


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


# ------------------------------------------------------------------ manifest


@dataclass
class Manifest:
    source: str
    count: int
    shards: list[dict[str, Any]]  # [{"path": "part-00000.parquet", "rows": n}]
    schema_version: int = SCHEMA_VERSION
    stats: dict[str, Any] = field(default_factory=dict)
    producer: str = ""
    created_at: str = ""

    def shard_uris(self, prefix: str) -> list[str]:
        return [storage.join(prefix, shard["path"]) for shard in self.shards]

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT,
            "schema_version": self.schema_version,
            "source": self.source,
            "count": self.count,
            "shards": self.shards,
            "columns": {f.name: str(f.type) for f in schema(self.source)},
            "stats": self.stats,
            "producer": self.producer,
            "created_at": self.created_at,
        }, indent=2)


def read_manifest(prefix: str) -> Manifest:
    """The manifest of the shard set at `prefix`; raises ShardError if it is missing,
    not a kosmos-g manifest, or written by a newer schema version than this code."""
    uri = storage.join(prefix, MANIFEST)
    try:
        data = json.loads(storage.read_text(uri))
    except storage.StorageNotFound as error:
        raise ShardError(f"no shard manifest at {uri}") from error
    except json.JSONDecodeError as error:
        raise ShardError(f"{uri} is not valid JSON: {error}") from error
    if data.get("format") != FORMAT:
        raise ShardError(f"{uri} is not a {FORMAT} manifest")
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ShardError(f"{uri} has schema version {version!r}; this code reads up to {SCHEMA_VERSION}")
    return Manifest(
        source=data["source"], count=int(data["count"]), shards=list(data["shards"]),
        schema_version=version, stats=dict(data.get("stats", {})),
        producer=data.get("producer", ""), created_at=data.get("created_at", ""),
    )


def write_manifest(prefix: str, manifest: Manifest) -> str:
    if not manifest.created_at:
        manifest.created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    uri = storage.join(prefix, MANIFEST)
    storage.write_text(uri, manifest.to_json())
    return uri


def parquet_uris(prefix: str) -> list[str]:
    """The Parquet files under a prefix, sorted (directory markers and others ignored)."""
    base = prefix.rstrip("/") + "/" if storage.parse(prefix).scheme == "s3" else prefix
    return [uri for uri in storage.list_uris(base) if uri.endswith(".parquet")]


def row_count(uri: str) -> int:
    """Rows in one Parquet file, read from its footer only."""
    filesystem, path = storage.pyarrow_filesystem(uri)
    with filesystem.open_input_file(path) as stream:
        return pq.ParquetFile(stream).metadata.num_rows


def entity_count(prefix: str) -> int:
    """Entities in a compositional shard set, from the Parquet footers only (one leaf
    value of `entities.text` per entity; our writers never store empty entity lists)."""
    total = 0
    for uri in read_manifest(prefix).shard_uris(prefix):
        filesystem, path = storage.pyarrow_filesystem(uri)
        with filesystem.open_input_file(path) as stream:
            metadata = pq.ParquetFile(stream).metadata
        for group in range(metadata.num_row_groups):
            for index in range(metadata.num_columns):
                column = metadata.row_group(group).column(index)
                if column.path_in_schema == "entities.list.element.text":
                    total += column.num_values
    return total


def build_manifest(prefix: str, source: str, stats: dict[str, Any] | None = None, producer: str = "") -> Manifest:
    """Scan the Parquet footers under `prefix`, then write and return its manifest."""
    shards = []
    base = prefix.rstrip("/")
    for uri in parquet_uris(prefix):
        relative = uri[len(base):].lstrip("/") if uri.startswith(base) else uri.rsplit("/", 1)[-1]
        shards.append({"path": relative, "rows": row_count(uri)})
    manifest = Manifest(source=source, count=sum(s["rows"] for s in shards), shards=shards,
                        stats=dict(stats or {}), producer=producer)
    write_manifest(prefix, manifest)
    return manifest


# ------------------------------------------------------------------- writers


def write_table(uri: str, table: pa.Table) -> None:
    """One Parquet file, written atomically through the storage API."""
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=ROW_GROUP_SIZE, compression="zstd")
    storage.write_bytes(uri, sink.getvalue())


def write_rows(prefix: str, source: str, rows: Iterable[dict[str, Any]], rows_per_shard: int = 1000,
               stats: dict[str, Any] | None = None, producer: str = "", total: int | None = None) -> Manifest:
    """Write rows of one source in-process (no Ray): for small sets such as the samples.
    Files are named part-00000.parquet, ... so rewriting the same rows gives the same files;
    Parquet files under `prefix` that this write did not produce are removed. `total`
    (rows expected, when `rows` has no len) sizes the progress report."""
    from kosmos_g.platform.progress import Progress

    expected = schema(source)
    batch: list[dict[str, Any]] = []
    written: list[str] = []

    def flush() -> None:
        uri = storage.join(prefix, shard_name(len(written)))
        write_table(uri, pa.Table.from_pylist(batch, schema=expected))
        written.append(uri)
        batch.clear()

    total = total if total is not None else (len(rows) if hasattr(rows, "__len__") else None)
    with Progress(f"write {source}", total=total, unit="rows") as progress:
        for row in rows:
            batch.append(row)
            progress.update()
            if len(batch) >= rows_per_shard:
                flush()
        if batch or not written:
            flush()
    for stale in set(parquet_uris(prefix)) - set(written):
        storage.delete(stale)
    return build_manifest(prefix, source, stats, producer)


class _PartNames:
    """Ray Data filename provider (duck-typed, so this module needs no Ray import): `part-<task index>-<file index>.parquet` with no
    per-write UUID, so re-running a job over the same input (same read tasks, order
    preserved) writes the same file names instead of adding a second copy of the data."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}"  # Ray appends "-{i}.parquet"

    def get_filename_for_block(self, block, write_uuid: str, task_index: int, block_index: int) -> str:
        return self.get_filename_for_task(write_uuid, task_index)


def write_dataset(ds, prefix: str, source: str, rows_per_shard: int = 1000,
                  stats: dict[str, Any] | Callable[[], dict[str, Any]] | None = None, producer: str = "",
                  num_cpus: float | None = None) -> Manifest:
    """Write a Ray Dataset whose rows follow the source schema, then its manifest.

    The prefix is replaced (Ray's OVERWRITE mode), so shards of an earlier run never
    mix with this one. Pass `stats` as a callable to compute them after the write."""
    from ray.data._internal.savemode import SaveMode

    expected = schema(source)
    ds = ds.select_columns(expected.names)
    filesystem, path = storage.pyarrow_filesystem(prefix)
    provider = _PartNames()
    ds.write_parquet(
        path, filesystem=filesystem, filename_provider=provider, mode=SaveMode.OVERWRITE,
        min_rows_per_file=rows_per_shard, schema=expected, row_group_size=ROW_GROUP_SIZE,
        compression="zstd", ray_remote_args={"num_cpus": num_cpus} if num_cpus is not None else None,
    )
    if callable(stats):
        stats = stats()
    return build_manifest(prefix, source, stats, producer)


def read_table(prefix: str, columns: list[str] | None = None) -> pa.Table:
    """Every row of a shard set as one Arrow table (tests, small sets, the benchmark's
    plain loop); training reads through Ray Data instead."""
    manifest = read_manifest(prefix)
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)
              for uri in manifest.shard_uris(prefix)]
    if not tables:
        return schema(manifest.source).empty_table()
    return pa.concat_tables(tables)
