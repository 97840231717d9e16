"""Parameter counts per component, trainable vs frozen for a given training stage.

The paper preset is built on the meta device: shapes only, nothing allocated, so counting
~3B parameters takes seconds on a laptop.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import model_preset


def _count(module: nn.Module, seen: set[int]) -> tuple[int, int]:
    trainable = frozen = 0
    for p in module.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def components(model) -> list[tuple[str, str, nn.Module]]:
    """(group, name, module) for every counted component of a KosmosG."""
    dec = model.image_decoder
    return [
        ("mllm", "mllm.vision", model.mllm.vision),
        ("mllm", "mllm.resampler", model.mllm.resampler),
        ("mllm", "mllm.decoder", model.mllm.decoder),
        ("aligner", "aligner.M", model.aligner.encoder),
        ("aligner", "aligner.N", model.aligner.decoder),
        ("image_decoder", "image_decoder.unet", dec.unet),
        ("image_decoder", "image_decoder.vae", dec.vae),
        ("image_decoder", "image_decoder.text_encoder", dec.text_encoder),
    ]


def parameter_counts(model) -> dict[str, Any]:
    """{"components": {name: {trainable, frozen, total}}, "groups": {...}, "total": {...}}."""
    seen: set[int] = set()
    rows: dict[str, dict[str, int]] = {}
    groups: dict[str, dict[str, int]] = {}
    for group, name, module in components(model):
        trainable, frozen = _count(module, seen)
        rows[name] = {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}
        g = groups.setdefault(group, {"trainable": 0, "frozen": 0, "total": 0})
        for key, value in rows[name].items():
            g[key] += value
    total = {k: sum(g[k] for g in groups.values()) for k in ("trainable", "frozen", "total")}
    return {"components": rows, "groups": groups, "total": total}


def preset_parameter_counts(preset: str, stage: int = 3) -> dict[str, Any]:
    """Counts for a named preset at a training stage, built on the meta device."""
    from .kosmos_g import KosmosG

    model = KosmosG.from_config(model_preset(preset), device="meta")
    model.set_stage(stage)
    return {"preset": preset, "stage": stage, **parameter_counts(model)}


def format_table(counts: dict[str, Any]) -> str:
    lines = [f"preset {counts['preset']}, stage {counts['stage']} (trainable / frozen / total)"]
    width = max(len(n) for n in counts["components"]) + 2

    def row(name: str, c: dict[str, int]) -> str:
        return f"{name:<{width}}{c['trainable']:>16,}{c['frozen']:>16,}{c['total']:>16,}"

    lines.append(f"{'component':<{width}}{'trainable':>16}{'frozen':>16}{'total':>16}")
    for name, c in counts["components"].items():
        lines.append(row(name, c))
    for name, c in counts["groups"].items():
        lines.append(row(f"[{name}]", c))
    lines.append(row("[total]", counts["total"]))
    return "\n".join(lines)
