"""Precomputed columns beside a source's shards: the frozen CLIP text teacher's output on each
caption (stage 2) and the frozen VAE's posterior of each target image (stage 3), written by
`pipelines/precompute.py` and read by the training stream in place of running the teacher / the
VAE at every step.

    <source prefix>.precomputed/<key>/part-00000.parquet   key + the precomputed columns, the
    <source prefix>.precomputed/<key>/part-00001.parquet   same rows in the same order as the
    <source prefix>.precomputed/<key>/manifest.json        shard of that name; written last

Beside the prefix, not in it: a shard set's manifest lists every Parquet file under its prefix.

`<key>` names what was computed and from which frozen model (`precompute_key`): another decoder,
another target size or another `min_image_side` is another key, so a stale set is never read.
Tensors are stored as .npy bytes (dtype and shape travel with them), in the frozen model's dtype,
so the loss is the same as computing them in the step (tests/data/test_precompute.py).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kosmos_g.platform import storage

SUFFIX = ".precomputed"
MANIFEST = "manifest.json"
KINDS = {2: "teacher", 3: "latents"}
# Per stage: the columns a precomputed shard adds, and the record column it makes unnecessary.
COLUMNS = {2: ["teacher"], 3: ["target_latents", "target_skip"]}
REPLACED = {3: {"captions": "image", "compositional": "image", "editing": "edited_image"}}


def npy_bytes(array: np.ndarray) -> bytes:
    """A stored tensor: .npy bytes, so its dtype and shape travel with it."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def stack_npy(values) -> np.ndarray:
    """Stored tensors of one column, stacked into one array."""
    return np.stack([np.load(io.BytesIO(raw)) for raw in values])


def precompute_key(stage: int, model_cfg, decoder_identity: str, data) -> str:
    """`<kind>-<hash>` of what decides the stored values: the frozen decoder (its config, with
    `decoder_identity` standing for where its weights come from) and, for targets, how target
    images are made (size, minimum side, decoding)."""
    if stage not in KINDS:
        raise ValueError(f"only stages 2 (teacher outputs) and 3 (latents) have precomputed columns, not {stage}")
    decoder = copy.deepcopy(asdict(model_cfg.image_decoder))
    decoder["pretrained_path"] = decoder_identity
    decided = {"kind": KINDS[stage], "decoder": decoder}
    if stage == 3:
        decided.update(min_image_side=data.min_image_side, fast_decode=data.fast_decode)
    digest = hashlib.sha256(json.dumps(decided, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{KINDS[stage]}-{digest}"


def prefix_for(source_prefix: str, key: str) -> str:
    return storage.join(source_prefix.rstrip("/") + SUFFIX, key)


def sibling_uris(source_prefix: str, sibling_prefix: str | None) -> list[tuple[str, str | None]]:
    """(shard URI, URI of its precomputed shard or None) for every shard of a source."""
    from kosmos_g.platform.data import shards

    manifest = shards.read_manifest(source_prefix)
    return [(storage.join(source_prefix, shard["path"]),
             storage.join(sibling_prefix, shard["path"]) if sibling_prefix else None) for shard in manifest.shards]


def source_digest(source_prefix: str) -> str:
    """Identifies the shards a set was computed from: rewritten shards make it stale."""
    from kosmos_g.platform.data import shards

    return hashlib.sha256(storage.read_bytes(storage.join(source_prefix, shards.MANIFEST))).hexdigest()[:16]


def is_complete(source_prefix: str, key: str) -> bool:
    manifest = storage.join(prefix_for(source_prefix, key), MANIFEST)
    if not storage.exists(manifest):
        return False
    return json.loads(storage.read_text(manifest)).get("source") == source_digest(source_prefix)


def find(sources: list[tuple[str, str]], key: str) -> dict[str, str]:
    """{source: precomputed prefix} when every (source, prefix) has a complete, current set for
    `key`; else {} (a stage reads all its sources one way, so no batch mixes both)."""
    if not sources or not all(is_complete(prefix, key) for _, prefix in sources):
        return {}
    return {name: prefix_for(prefix, key) for name, prefix in sources}


def read_columns(stage: int, source: str, columns: list[str], precomputed: bool) -> list[str]:
    """The record columns to read: without the ones a precomputed set replaces."""
    if not precomputed:
        return columns
    replaced = REPLACED.get(stage, {}).get(source)
    return [column for column in columns if column != replaced]


def read_shard(uri: str, columns: list[str], filesystem, sibling: str | None = None) -> pa.Table:
    """One shard's records; with `sibling` (its precomputed shard), the precomputed columns of
    the same rows appended (checked key by key: a set written for other rows is an error)."""
    table = pq.read_table(storage.pyarrow_path(uri), filesystem=filesystem, columns=columns)
    if sibling is None:
        return table
    extra = pq.read_table(storage.pyarrow_path(sibling), filesystem=filesystem)
    if not extra.column("key").equals(table.column("key")):
        raise ValueError(f"{sibling} does not hold the rows of {uri} in order: run pipelines/precompute.py again")
    for name in extra.column_names:
        if name != "key":
            table = table.append_column(extra.field(name), extra.column(name))
    return table


class ShardEncoder:
    """Ray Data actor: one source shard per call (a row of `uri`, `sibling`) -> its precomputed
    shard, written whole beside it. A subclass says what one shard's columns are (`encode`)."""

    def __init__(self, source_prefix: str, key: str):
        self.out_prefix = prefix_for(source_prefix, key)
        self.filesystem, _ = storage.pyarrow_filesystem(source_prefix)

    def encode(self, uri: str) -> tuple[dict, int]:
        """({column: values}, `key` first, for every row of the shard at `uri`; rows kept as skipped)."""
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        uri, out = batch.column("uri")[0].as_py(), batch.column("sibling")[0].as_py()
        columns, skipped = self.encode(uri)
        table = pa.table(columns)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes(out, buffer.getvalue())  # one object, written whole
        return pa.table({"shard": [out[len(self.out_prefix):].lstrip("/")], "rows": [table.num_rows],
                         "skipped": [skipped]})


def encode_source(source_prefix: str, key: str, identity: str, encoder: type[ShardEncoder], encoder_kwargs: dict,
                  *, concurrency: int = 1, num_cpus: float = 1.0, num_gpus: float = 0,
                  label: str = "[precompute]") -> dict[str, int]:
    """Every shard of one source through a pool of `encoder` actors, progress printed per shard;
    the set's manifest once all are written. Returns its rows, rows kept as skipped and shards."""
    import ray

    pairs = sibling_uris(source_prefix, prefix_for(source_prefix, key))
    items = [{"uri": uri, "sibling": sibling} for uri, sibling in pairs]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        encoder, fn_constructor_kwargs={**encoder_kwargs, "source_prefix": source_prefix, "key": key},
        batch_format="pyarrow", batch_size=1, concurrency=concurrency, num_cpus=num_cpus, num_gpus=num_gpus)
    shard_rows, skipped = {}, 0
    for done, row in enumerate(ds.iter_rows(), 1):
        shard_rows[row["shard"]] = int(row["rows"])
        skipped += int(row["skipped"])
        print(f"{label}: {done}/{len(items)} shards ({sum(shard_rows.values())} rows)", flush=True)
    write_manifest(source_prefix, key, identity, shard_rows)
    return {"rows": sum(shard_rows.values()), "skipped": skipped, "shards": len(shard_rows)}


def write_manifest(source_prefix: str, key: str, identity: str, shard_rows: dict[str, int]) -> None:
    """Marks a set complete: written after every shard file."""
    storage.write_text(storage.join(prefix_for(source_prefix, key), MANIFEST), json.dumps(
        {"key": key, "decoder": identity, "source": source_digest(source_prefix),
         "count": sum(shard_rows.values()),
         "shards": [{"path": name, "rows": rows} for name, rows in sorted(shard_rows.items())]}, indent=2))
