"""LoRA adapters for the frozen U-Net, fetched by name from a storage prefix.

Fetching (storage -> state dict) is what Ray Serve's `serve.multiplexed` caches per
replica. Installing into the U-Net is separate and happens under the denoiser's compute
lock, right before a group that needs it: an adapter evicted from the multiplex cache
while a batch still holds its weights is simply installed again, never pulled from under
a running forward pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from kosmos_g.platform import storage
from kosmos_g.serve.messages import RequestError

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class AdapterWeights:
    name: str
    state_dict: dict
    network_alphas: dict | None


def fetch_adapter(prefix: str, name: str) -> AdapterWeights:
    """Read `<prefix>/<name>/pytorch_lora_weights.safetensors` (diffusers LoRA format)."""
    from diffusers import StableDiffusionPipeline

    uri = storage.join(prefix, name)
    if not storage.exists(storage.join(uri, WEIGHTS_FILE)):
        raise RequestError(404, f"lora: no adapter named {name!r} (looked for {WEIGHTS_FILE} under it)")
    local = storage.local_dir(uri)
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(local), weight_name=WEIGHTS_FILE)
    unet_keys = [k for k in state_dict if k.startswith("unet.")]
    if not unet_keys:
        raise RequestError(400, f"lora: adapter {name!r} has no U-Net weights")
    return AdapterWeights(name, {k: state_dict[k] for k in unet_keys}, alphas)


def list_adapters(prefix: str | None) -> list[str]:
    if not prefix:
        return []
    base = storage.parse(prefix).path.rstrip("/") + "/"
    names = set()
    for uri in storage.list_uris(prefix.rstrip("/") + "/"):
        relative = storage.parse(uri).path[len(base):]
        parts = relative.split("/")
        if len(parts) == 2 and parts[1] == WEIGHTS_FILE:
            names.add(parts[0])
    return sorted(names)


class AdapterSlots:
    """Which adapters are installed in one U-Net, and which one is active."""

    def __init__(self, unet):
        self.unet = unet
        self.installed: set[str] = set()

    def activate(self, weights: AdapterWeights | None) -> None:
        """Make `weights` the active adapter (None: run the plain U-Net)."""
        if weights is None:
            if self.installed:
                self.unet.disable_lora()
            return
        if weights.name not in self.installed:
            self._install(weights)
        self.unet.enable_lora()
        self.unet.set_adapters([weights.name])

    def _install(self, weights: AdapterWeights) -> None:
        from diffusers import StableDiffusionPipeline

        with warnings.catch_warnings():  # peft warns about keeping several adapters: intended
            warnings.simplefilter("ignore")
            try:
                StableDiffusionPipeline.load_lora_into_unet(
                    dict(weights.state_dict), weights.network_alphas, self.unet, adapter_name=weights.name)
            except (ValueError, RuntimeError, KeyError) as error:
                raise RequestError(400, f"lora: adapter {weights.name!r} does not fit this model's U-Net: "
                                        f"{str(error)[:200]}") from None
        self.installed.add(weights.name)

    def remove(self, name: str) -> None:
        if name not in self.installed:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.unet.delete_adapters(name)
        self.installed.discard(name)
        if not self.installed:
            return
        # delete_adapters may have switched the active adapter: the next group sets its own.
        self.unet.disable_lora()
