"""Stage-1 sequence packing: example rows concatenated into rows of up to `pack_length` tokens.

As the released pre-training feeds 2,048-token sequences, short documents (a caption, an
image-caption pair, a text chunk) share a row instead of being padded. Boundaries are kept
in attention, not only by reset positions: each document attends to itself alone
(block-diagonal causal mask) and its absolute positions restart at 2, so a packed document
is computed exactly as it would be alone (models/layers.py: document_mask, fairseq_positions).
Its `<s>` is never a target, so no loss crosses a boundary either. `doc_lengths` records the
documents of a row; the collator turns it into `document_ids`.

Greedy, order-preserving: a row is closed when the next document does not fit. Works on the
preprocessed example rows (OUTPUT_SCHEMA) of one Ray Data batch at a time.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kosmos_g.platform.data.examples import OUTPUT_SCHEMA

_SUMMED = ("n_images", "n_entities", "n_entity_text_dropped", "n_background_kept")


def _merge(rows: list[dict]) -> dict:
    if len(rows) == 1:
        return rows[0]
    merged = {
        "source": "packed", "key": "+".join(r["key"] for r in rows), "draw": rows[0]["draw"],
        "input_ids": [t for r in rows for t in r["input_ids"]],
        "image_mask": [t for r in rows for t in r["image_mask"]],
        "loss_mask": [t for r in rows for t in r["loss_mask"]],
        "clip_pixels": b"".join(r["clip_pixels"] or b"" for r in rows),
        "caption": "", "target_pixels": None, "input_caption_dropped": False,
        "doc_lengths": [n for r in rows for n in r["doc_lengths"]],
    }
    merged.update({name: sum(r[name] for r in rows) for name in _SUMMED})
    return merged


def pack_rows(rows: list[dict], pack_length: int) -> list[dict]:
    """Greedy packing of example rows (in order) into rows of at most `pack_length` tokens;
    a row longer than that on its own stays alone."""
    packed, current, used = [], [], 0
    for row in rows:
        length = len(row["input_ids"])
        if current and used + length > pack_length:
            packed.append(_merge(current))
            current, used = [], 0
        current.append(row)
        used += length
    if current:
        packed.append(_merge(current))
    return packed


def pack_table(table: pa.Table, pack_length: int) -> pa.Table:
    """Ray Data UDF (`batch_format="pyarrow"`)."""
    rows = pack_rows(table.to_pylist(), pack_length)
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def document_ids(doc_lengths: list[list[int]], length: int) -> np.ndarray:
    """(B, length) ids: 1, 2, … per document of each row, 0 on padding."""
    ids = np.zeros((len(doc_lengths), length), dtype=np.int64)
    for i, lengths in enumerate(doc_lengths):
        start = 0
        for number, n in enumerate(lengths, start=1):
            ids[i, start:start + n] = number
            start += n
    return ids
