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
import json

import numpy as np
import pyarrow as pa

from kosmos_g.platform.data import precomputed

COLUMNS = ("latent_moments", "condition")


def decoder_inputs_key(vae_uri: str, clip_uri: str, image_size: int) -> str:
    """`decoder-<hash>` of what decides the stored values: the VAE bundle, the text CLIP, the size."""
    decided = {"kind": "decoder", "vae": vae_uri, "clip": clip_uri, "image_size": image_size}
    return "decoder-" + hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:12]


class FrozenInputs:
    """The frozen VAE and text encoder of the decoder job's U-Net part, on the inputs the step's
    stream prepares (backbones.BackbonePreprocessor: one preparation, so the losses cannot drift)."""

    def __init__(self, vae_dir, clip_dir, image_size: int):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        from kosmos_g.platform.train.backbones import BackbonePreprocessor

        self.vae = AutoencoderKL.from_pretrained(f"{vae_dir}/vae").requires_grad_(False).eval()
        self.text_encoder = CLIPTextModel.from_pretrained(clip_dir).requires_grad_(False).eval()
        self.prepare = BackbonePreprocessor(image_size, "vae")

    def __call__(self, records: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Caption records (`caption`, `image`) -> (VAE posterior moments (B, 2C, h, w), text hidden
        states (B, 77, D)), float32."""
        import torch

        batch = self.prepare(records.select(["caption", "image"]))
        with torch.no_grad():
            moments = self.vae.encode(torch.from_numpy(batch["pixel_values"])).latent_dist.parameters
            condition = self.text_encoder(input_ids=torch.from_numpy(batch["input_ids"])).last_hidden_state
        return moments.float().numpy(), condition.float().numpy()


class DecoderShardEncoder(precomputed.ShardEncoder):
    """One caption shard -> its records' decoder inputs (`latent_moments`, `condition`)."""

    def __init__(self, vae_uri: str, clip_uri: str, image_size: int, source_prefix: str, key: str,
                 batch_size: int = 64):
        import torch

        from kosmos_g.platform import tracking

        super().__init__(source_prefix, key)
        torch.set_num_threads(2)  # the job's only work while it runs: the trainer has not started
        self.frozen = FrozenInputs(tracking.resolve_artifacts(vae_uri), tracking.resolve_artifacts(clip_uri),
                                   image_size)
        self.batch_size = batch_size

    def encode(self, uri: str) -> tuple[dict, int]:
        records = precomputed.read_shard(uri, ["key", "caption", "image"], self.filesystem)
        moments, conditions = [], []
        for start in range(0, records.num_rows, self.batch_size):
            moment, condition = self.frozen(records.slice(start, self.batch_size))
            moments += [precomputed.npy_bytes(m) for m in moment]
            conditions += [precomputed.npy_bytes(c) for c in condition]
        return {"key": records.column("key"), "latent_moments": pa.array(moments, pa.binary()),
                "condition": pa.array(conditions, pa.binary())}, 0


def ensure_decoder_inputs(source_prefix: str, vae_uri: str, clip_uri: str, image_size: int,
                          log_prefix: str = "[mini-decoder]") -> str:
    """The prefix of the decoder-input set beside `source_prefix` for this VAE and CLIP, computed
    by a Ray Data actor over its shards unless a complete one is there (a resumed job finds it)."""
    key = decoder_inputs_key(vae_uri, clip_uri, image_size)
    prefix = precomputed.prefix_for(source_prefix, key)
    if precomputed.is_complete(source_prefix, key):
        print(f"{log_prefix} precomputed decoder inputs {key}: complete, read from {prefix}", flush=True)
        return prefix
    precomputed.encode_source(source_prefix, key, f"{vae_uri} + {clip_uri}", DecoderShardEncoder,
                              {"vae_uri": vae_uri, "clip_uri": clip_uri, "image_size": image_size},
                              label=f"{log_prefix} precomputing decoder inputs {key}")
    return prefix
