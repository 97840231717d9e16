"""What the mini decoder's U-Net reads instead of running its frozen models at every step: the
frozen VAE's posterior of each scene and the frozen text CLIP's 77 hidden states of its caption,
computed once per record between the decoder job's VAE and U-Net parts and written beside the
world's caption shards (platform/data/precomputed.py's layout, key `decoder-<hash>`).

The U-Net trains 5,000 steps of 32 over 10,000 scenes, so every record goes through the frozen
VAE encoder and text encoder 16 times in the step (≈ 13% of it on a 2-core CPU); once is enough.
The losses are the same either way: the posterior is sampled in the step with the same generator
and the stored tensors are the frozen models' float32 outputs (tests/training/test_backbones.py).
`data.precomputed=off` computes them in the step as before.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kosmos_g.platform import storage
from kosmos_g.platform.data import precomputed

COLUMNS = ("latent_moments", "condition")


def decoder_inputs_key(vae_uri: str, clip_uri: str, image_size: int) -> str:
    """`decoder-<hash>` of what decides the stored values: the VAE bundle, the text CLIP, the size."""
    decided = {"kind": "decoder", "vae": vae_uri, "clip": clip_uri, "image_size": image_size}
    return "decoder-" + hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:12]


class FrozenInputs:
    """The frozen VAE and text encoder of the decoder job's U-Net part, as the step runs them."""

    def __init__(self, vae_dir, clip_dir, image_size: int):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        from kosmos_g.models.tokenizers import build_clip_tokenizer

        self.vae = AutoencoderKL.from_pretrained(f"{vae_dir}/vae").requires_grad_(False).eval()
        self.text_encoder = CLIPTextModel.from_pretrained(clip_dir).requires_grad_(False).eval()
        self.tokenizer = build_clip_tokenizer()
        self.image_size = image_size

    def __call__(self, captions: list[str], images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(VAE posterior moments (B, 2C, h, w), text hidden states (B, 77, D)), float32."""
        import torch

        from kosmos_g.models.images import to_pil, vae_preprocess
        from kosmos_g.models.mini import CONDITION_LENGTH
        from kosmos_g.platform.data import imaging

        ids = self.tokenizer(captions, padding="max_length", max_length=CONDITION_LENGTH, truncation=True,
                             return_tensors="pt").input_ids
        pixels = torch.stack([vae_preprocess(to_pil(imaging.decode_image(data)), self.image_size) for data in images])
        with torch.no_grad():
            moments = self.vae.encode(pixels).latent_dist.parameters
            condition = self.text_encoder(input_ids=ids).last_hidden_state
        return moments.float().numpy(), condition.float().numpy()


class ShardInputsEncoder:
    """Ray Data actor: one caption shard per call -> its shard of decoder inputs, written beside it."""

    def __init__(self, vae_uri: str, clip_uri: str, image_size: int, source_prefix: str, key: str,
                 batch_size: int = 64):
        import torch

        from kosmos_g.platform import tracking

        torch.set_num_threads(2)  # the job's only work while it runs: the trainer has not started
        self.frozen = FrozenInputs(tracking.resolve_artifacts(vae_uri), tracking.resolve_artifacts(clip_uri),
                                   image_size)
        self.out_prefix = precomputed.prefix_for(source_prefix, key)
        self.filesystem, _ = storage.pyarrow_filesystem(source_prefix)
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        uri, out = batch.column("uri")[0].as_py(), batch.column("sibling")[0].as_py()
        records = precomputed.read_shard(uri, ["key", "caption", "image"], self.filesystem)
        captions, images = records.column("caption").to_pylist(), records.column("image").to_pylist()
        moments, conditions = [], []
        for start in range(0, len(captions), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            moment, condition = self.frozen(captions[chunk], images[chunk])
            moments += [precomputed.npy_bytes(m) for m in moment]
            conditions += [precomputed.npy_bytes(c) for c in condition]
        table = pa.table({"key": records.column("key"), "latent_moments": pa.array(moments, pa.binary()),
                          "condition": pa.array(conditions, pa.binary())})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes(out, buffer.getvalue())  # one object, written whole
        return pa.table({"shard": [out[len(self.out_prefix):].lstrip("/")], "rows": [table.num_rows]})


def ensure_decoder_inputs(source_prefix: str, vae_uri: str, clip_uri: str, image_size: int,
                          log_prefix: str = "[mini-decoder]") -> str:
    """The prefix of the decoder-input set beside `source_prefix` for this VAE and CLIP, computed
    by a Ray Data actor over its shards unless a complete one is there (a resumed job finds it)."""
    import ray

    key = decoder_inputs_key(vae_uri, clip_uri, image_size)
    prefix = precomputed.prefix_for(source_prefix, key)
    if precomputed.is_complete(source_prefix, key):
        print(f"{log_prefix} precomputed decoder inputs {key}: complete, read from {prefix}", flush=True)
        return prefix
    pairs = precomputed.sibling_uris(source_prefix, prefix)
    items = [{"uri": uri, "sibling": sibling} for uri, sibling in pairs]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardInputsEncoder, fn_constructor_kwargs={"vae_uri": vae_uri, "clip_uri": clip_uri,
                                                   "image_size": image_size, "source_prefix": source_prefix,
                                                   "key": key},
        batch_format="pyarrow", batch_size=1, concurrency=1, num_cpus=1)
    shard_rows = {}
    for done, row in enumerate(ds.iter_rows(), 1):
        shard_rows[row["shard"]] = int(row["rows"])
        print(f"{log_prefix} precomputing decoder inputs {key}: {done}/{len(items)} shards "
              f"({sum(shard_rows.values())} records)", flush=True)
    precomputed.write_manifest(source_prefix, key, f"{vae_uri} + {clip_uri}", shard_rows)
    return prefix
