"""The text CLIP's role-swap negatives (`clip.role_negatives`): the preprocessor tokenises each
caption's swap, and the loss is CLIP's own when no swap is a negative and grows when they are."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from kosmos_g.models.mini import clip_loss
from kosmos_g.platform.data import world
from kosmos_g.platform.train.backbone_job import backbone_presets
from kosmos_g.platform.train.backbones import BackbonePreprocessor, ClipTask, to_tensors


def _batch(count: int = 12) -> dict[str, torch.Tensor]:
    cfg = backbone_presets("text-clip").get("tiny", ["clip.role_negatives=true"])
    table = pa.Table.from_pylist(world.caption_rows(world.scenes(3, count)))
    preprocessor = BackbonePreprocessor(cfg.clip.image_size, "clip", role_negatives=True)
    batch = preprocessor(table)
    captions = table.column("caption").to_pylist()
    assert batch["negative_valid"].tolist() == [world.role_swap(c) is not None for c in captions]
    assert 0 < batch["negative_valid"].sum() < count
    for row, caption in enumerate(captions):
        expected = preprocessor.tokens([world.role_swap(caption) or caption])[0][0]
        assert np.array_equal(batch["negative_input_ids"][row], expected)
    return cfg, to_tensors(batch)


def test_role_negatives_reach_the_loss_and_leave_clips_own_when_none_is_valid():
    cfg, batch = _batch()
    task = ClipTask()
    model = task.build(cfg, None, torch.device("cpu"))
    with torch.no_grad():
        with_negatives = task.losses(model, batch, cfg)["loss"]
        plain = {k: v for k, v in batch.items() if not k.startswith("negative_")}
        own = model.clip(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], return_loss=True).loss
        assert torch.allclose(task.losses(model, plain, cfg)["loss"], own)
        none_valid = clip_loss(model.clip, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                               (batch["negative_input_ids"], batch["negative_attention_mask"],
                                torch.zeros_like(batch["negative_valid"])))
    assert torch.allclose(none_valid, own, atol=1e-6)
    # More texts in each image's softmax: its cross-entropy can only grow.
    assert with_negatives > own


def test_role_negatives_stay_out_of_the_fingerprint_when_off():
    """Text CLIPs registered before the option existed keep their fingerprint (and are reused)."""
    from kosmos_g.platform.config import fingerprint, inert_fields
    from kosmos_g.platform.train.backbone_job import NOT_DECIDING

    off = backbone_presets("text-clip").get("mini")
    on = backbone_presets("text-clip").get("mini", ["clip.role_negatives=true"])
    assert off.clip.role_negatives is False
    assert "clip.role_negatives" in inert_fields(off) and "clip.role_negatives" not in inert_fields(on)
    assert fingerprint(on, NOT_DECIDING) != fingerprint(off, NOT_DECIDING)
