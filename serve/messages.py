"""What the deployments pass each other (pickled by Ray), and the errors they share.

Plain dataclasses over bytes and numpy arrays: the ingress builds them without
importing torch, and a conditioning crosses the object store as two small arrays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# API scheduler names -> models.generation.SCHEDULERS keys (tests check they exist there).
SCHEDULER_ALIASES = {
    "dpm++": "dpm++", "dpmsolver++": "dpm++", "dpm-solver++": "dpm++", "dpmpp": "dpm++",
    "ddim": "ddim", "euler": "euler", "ddpm": "ddpm",
}
SCHEDULER_NAMES = ("dpm++", "ddim", "euler", "ddpm")
# Adapter names become storage keys: no separators, no "..", nothing a URL could hide in.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def canonical_scheduler(name: str) -> str | None:
    """The scheduler key for an API name (case- and spelling-tolerant), or None."""
    return SCHEDULER_ALIASES.get(name.strip().lower().replace("_", "-").replace(" ", "-"))


class RequestError(Exception):
    """A problem with one request (its sender can fix it): becomes a 4xx response.

    Raised inside replicas too; Ray re-raises it at the caller as a subclass of this type."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self):  # keep status and message across Ray's pickling
        return (type(self), (self.status, self.message))


@dataclass
class ImageInput:
    """An uploaded image, already validated by the ingress."""

    digest: str  # sha256 of the uploaded bytes: the encoder's cache key
    data: bytes  # decoded again only on a cache miss


@dataclass
class EncodeRequest:
    segments: list  # str | ImageInput, in prompt order
    negative_prompt: str | None = None


@dataclass
class Conditioning:
    cond: np.ndarray  # (condition_length, condition_dim) float32
    uncond: np.ndarray  # same shape: the negative prompt's, or the bare <s> encoding
    batch_size: int  # requests encoded together in this replica call
    cache_hits: int
    cache_misses: int
    compute_s: float


@dataclass
class DenoiseRequest:
    conditioning: Conditioning
    num_images: int
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    height: int | None = None  # None: the model's native size
    width: int | None = None
    control_image: bytes | None = None
    control_scale: float = 1.0
    adapter: str | None = None
    # Set by Denoiser.generate_stream: the replica reports this request's steps under it.
    progress_id: str | None = None


@dataclass
class DenoiseResult:
    images: list[bytes]  # PNG files
    height: int
    width: int
    batch_size: int  # requests in the replica's batch
    group_size: int  # requests that shared each U-Net forward pass with this one
    queue_s: float
    denoise_s: float
    decode_s: float
