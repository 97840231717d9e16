"""Importers: common public layouts -> shards (Ray Data jobs).

- `import_captions`: an image-caption table (Parquet, TSV/CSV with a header, or JSON
  lines) whose image column holds a path (relative to the table's folder, absolute, or
  a storage URI), base64 text (optionally a `data:` URI), raw bytes, or a Hugging Face
  `{"bytes", "path"}` struct. URLs are never fetched: such rows are skipped and counted.
- `import_instructpix2pix`: the InstructPix2Pix release layout (one folder per prompt
  with `prompt.json` = {"input", "edit", "output"} and image pairs `<seed>_0.jpg` /
  `<seed>_1.jpg`), or a table with the columns of its Hugging Face copy
  (original_prompt, original_image, edit_prompt, edited_prompt, edited_image).

Each importer decodes every image once to reject corrupt ones, writes shards with
deterministic names (re-running replaces them), and returns the manifest, whose
`stats["skipped"]` holds the skip counts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import posixpath
import re
import uuid
from typing import Any

import pyarrow as pa

from kosmos_g.platform.data import imaging, shards, skips
from kosmos_g.platform import storage
from kosmos_g.platform.data.skips import SkipRecord

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_EXTENSIONS = {".parquet": "parquet", ".tsv": "tsv", ".csv": "csv", ".jsonl": "json", ".json": "json"}
IP2P_COLUMNS = {  # shard column -> Hugging Face column of the InstructPix2Pix table
    "input_caption": "original_prompt", "input_image": "original_image", "instruction": "edit_prompt",
    "edited_image": "edited_image", "edited_caption": "edited_prompt",
}
_PAIR = re.compile(r"^(?P<seed>.+)_(?P<side>[01])\.(?:jpe?g|png|webp)$", re.IGNORECASE)


# ------------------------------------------------------------------ reading tables


def _table_files(table: str) -> list[str]:
    location = storage.parse(table)
    if os.path.splitext(location.path)[1].lower() in TABLE_EXTENSIONS and storage.exists(table):
        return [table]
    prefix = table.rstrip("/") + "/" if location.scheme == "s3" else table
    files = [uri for uri in storage.list_uris(prefix) if os.path.splitext(uri)[1].lower() in TABLE_EXTENSIONS]
    if not files:
        raise FileNotFoundError(f"no table (.parquet/.tsv/.csv/.jsonl) at {table}")
    return files


def _base_dir(table: str) -> str:
    """Relative image paths are resolved against the table's folder."""
    location = storage.parse(table)
    if os.path.splitext(location.path)[1].lower() in TABLE_EXTENSIONS:
        return table.rsplit("/", 1)[0] if location.scheme == "s3" else os.path.dirname(location.path)
    return table.rstrip("/")


def read_table_dataset(table: str, num_cpus: float = 1.0):
    """A Ray Dataset over a table file or a prefix of table files (one format)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import ray

    files = _table_files(table)
    kinds = {TABLE_EXTENSIONS[os.path.splitext(f)[1].lower()] for f in files}
    if len(kinds) > 1:
        raise ValueError(f"{table} mixes table formats: {sorted(kinds)}")
    kind = kinds.pop()
    filesystem, _ = storage.pyarrow_filesystem(files[0])
    paths = [storage.pyarrow_path(f) for f in files]
    common = {"filesystem": filesystem, "num_cpus": num_cpus}
    if kind == "parquet":
        return ray.data.read_parquet(paths, **common)
    # Base64 images make rows long: a read block must hold whole rows.
    if kind == "json":  # pyarrow's JSON reader takes one object per line (JSON lines)
        return ray.data.read_json(paths, read_options=pajson.ReadOptions(block_size=256 << 20), **common)
    # Quotes are data in TSV.
    delimiter = "\t" if kind == "tsv" else ","
    return ray.data.read_csv(
        paths, read_options=pacsv.ReadOptions(block_size=256 << 20),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False if kind == "tsv" else '"'),
        **common,
    )


# ------------------------------------------------------------------ image values


def content_key(*parts: str | bytes) -> str:
    """A stable key from a record's content (used when the table has no key column)."""
    digest = hashlib.blake2b(digest_size=10)
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def image_bytes(value: Any, base: str) -> bytes:
    """Encoded image bytes from a table cell (see module docstring); raises SkipRecord."""
    if isinstance(value, dict):  # Hugging Face Image feature
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise SkipRecord("missing_field", "image")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str) or not value.strip():
        raise SkipRecord("missing_field", "image")
    text = value.strip()
    if text.startswith(("http://", "https://")):
        raise SkipRecord("url_not_fetched", text)
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
        return _b64(text)
    # Base64 JPEGs start with "/9j/", so only short values with a scheme or an image
    # extension are taken for paths.
    if len(text) < 4096 and ("://" in text or text.lower().endswith(IMAGE_EXTENSIONS)):
        uri = text if "://" in text or os.path.isabs(text) else storage.join(base, text)
        try:
            return storage.read_bytes(uri)
        except (storage.StorageNotFound, OSError) as error:
            raise SkipRecord("missing_file", uri) from error
    return _b64(text)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise SkipRecord("decode_error", "neither a path nor base64") from error


def _checked(data: bytes) -> tuple[int, int]:
    try:
        return imaging.image_size(data)
    except imaging.ImageDecodeError as error:
        raise SkipRecord("decode_error", str(error)) from error


def _caption(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SkipRecord("missing_field", "caption")
    return value.strip()


def _convert(table: pa.Table, source: str, convert_row, counter: str, **kwargs) -> pa.Table:
    """Apply `convert_row` to every row, skipping and counting the ones it rejects."""
    rows, skipped = [], {}
    for row in table.to_pylist():
        try:
            rows.append(convert_row(row, **kwargs))
        except SkipRecord as skip:
            skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
    skips.SkipRecorder(counter).record(skipped)
    return shards.to_table(source, rows)


# ------------------------------------------------------------------ captions


def _caption_row(row: dict, image_column: str, caption_column: str, key_column: str | None, base: str) -> dict:
    caption = _caption(row.get(caption_column))
    data = image_bytes(row.get(image_column), base)
    width, height = _checked(data)
    key = row.get(key_column) if key_column else None
    key = str(key) if key not in (None, "") else content_key(caption, data)
    return {"key": key, "caption": caption, "image": data, "width": width, "height": height}


def import_captions(table: str, output: str, *, image_column: str = "image", caption_column: str = "caption",
                    key_column: str | None = None, base: str | None = None, rows_per_shard: int = 1000,
                    num_cpus: float = 1.0) -> shards.Manifest:
    """Image-caption table -> captions shards under `output`."""
    ds = read_table_dataset(table, num_cpus)
    kwargs = {"image_column": image_column, "caption_column": caption_column, "key_column": key_column,
              "base": base or _base_dir(table)}
    return _run(ds, output, "captions", _caption_row, kwargs, rows_per_shard, num_cpus, f"import_captions({table})")


# ------------------------------------------------------------------ editing


def _editing_table_row(row: dict, columns: dict[str, str], base: str) -> dict:
    def cell(name: str) -> Any:
        return row.get(columns[name], row.get(name))

    input_image = image_bytes(cell("input_image"), base)
    edited_image = image_bytes(cell("edited_image"), base)
    _checked(input_image), _checked(edited_image)
    instruction = cell("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise SkipRecord("missing_field", "instruction")
    input_caption = cell("input_caption") or ""
    key = row.get("key") or content_key(instruction, input_caption, input_image, edited_image)
    return {"key": str(key), "input_caption": input_caption, "input_image": input_image,
            "instruction": instruction, "edited_image": edited_image, "edited_caption": cell("edited_caption")}


def _editing_folder_row(row: dict) -> dict:
    try:
        prompt = json.loads(storage.read_text(row["prompt"]))
    except (storage.StorageNotFound, json.JSONDecodeError) as error:
        raise SkipRecord("missing_field", f"prompt.json: {error}") from error
    images = []
    for side in ("input", "edited"):
        try:
            images.append(storage.read_bytes(row[side]))
        except storage.StorageNotFound as error:
            raise SkipRecord("missing_file", row[side]) from error
        _checked(images[-1])
    instruction = prompt.get("edit")
    if not isinstance(instruction, str) or not instruction.strip():
        raise SkipRecord("missing_field", "instruction")
    return {"key": row["key"], "input_caption": prompt.get("input") or "", "input_image": images[0],
            "instruction": instruction.strip(), "edited_image": images[1], "edited_caption": prompt.get("output")}


def instructpix2pix_pairs(source: str) -> list[dict]:
    """{key, prompt, input, edited} URIs for every `<seed>_0/_1` pair beside a prompt.json."""
    prefix = source.rstrip("/") + "/" if storage.parse(source).scheme == "s3" else source
    by_dir: dict[str, dict[str, Any]] = {}
    for uri in storage.list_uris(prefix):
        folder, name = posixpath.split(uri.replace(os.sep, "/"))
        entry = by_dir.setdefault(folder, {"prompt": None, "pairs": {}})
        if name == "prompt.json":
            entry["prompt"] = uri
        elif (match := _PAIR.match(name)):
            side = "input" if match["side"] == "0" else "edited"
            entry["pairs"].setdefault(match["seed"], {})[side] = uri
    root = source.replace(os.sep, "/").rstrip("/")
    items = []
    for folder, entry in sorted(by_dir.items()):
        for seed, pair in sorted(entry["pairs"].items()):
            if entry["prompt"] and len(pair) == 2:
                relative = folder[len(root):].strip("/") if folder.startswith(root) else folder
                items.append({"key": f"{relative}/{seed}".strip("/"), "prompt": entry["prompt"], **pair})
    return items


def import_instructpix2pix(source: str, output: str, *, layout: str = "auto", columns: dict[str, str] | None = None,
                           base: str | None = None, rows_per_shard: int = 1000, num_cpus: float = 1.0) -> shards.Manifest:
    """InstructPix2Pix folders (layout="folders") or table (layout="table") -> editing shards."""
    import ray

    if layout == "auto":
        is_table = os.path.splitext(storage.parse(source).path)[1].lower() in TABLE_EXTENSIONS
        layout = "table" if is_table or not instructpix2pix_pairs(source) else "folders"
    if layout == "folders":
        items = instructpix2pix_pairs(source)
        if not items:
            raise FileNotFoundError(f"no prompt.json with <seed>_0/<seed>_1 image pairs under {source}")
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 64, 512)))
        return _run(ds, output, "editing", _editing_folder_row, {}, rows_per_shard, num_cpus,
                    f"import_instructpix2pix({source})")
    if layout != "table":
        raise ValueError(f"layout must be 'auto', 'folders' or 'table', got {layout!r}")
    kwargs = {"columns": {**IP2P_COLUMNS, **(columns or {})}, "base": base or _base_dir(source)}
    return _run(read_table_dataset(source, num_cpus), output, "editing", _editing_table_row, kwargs,
                rows_per_shard, num_cpus, f"import_instructpix2pix({source})")


# ------------------------------------------------------------------ driver


def _run(ds, output: str, source: str, convert_row, kwargs: dict, rows_per_shard: int, num_cpus: float,
         producer: str) -> shards.Manifest:
    counter = f"kosmos-g-import-{uuid.uuid4().hex[:12]}"
    skips.ensure_counter(counter)
    storage.ensure_bucket(output)
    try:
        ds = ds.map_batches(_convert, fn_args=(source, convert_row, counter), fn_kwargs=kwargs,
                            batch_format="pyarrow", num_cpus=num_cpus)
        # Same input, same order, same files: a re-run replaces rather than duplicates.
        ds.context.execution_options.preserve_order = True
        return shards.write_dataset(ds, output, source, rows_per_shard,
                                    stats=lambda: {"skipped": skips.skip_counts(counter)},
                                    producer=producer, num_cpus=num_cpus)
    finally:
        skips.drop_counter(counter)
