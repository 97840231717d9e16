"""The MLLM: CLIP vision encoder (incl. loading real-format weights), resampler, Magneto decoder."""

from __future__ import annotations

import pytest
import torch

from kosmos_g.models.config import MLLMConfig, VisionConfig, model_preset
from kosmos_g.models.kosmos_g import KosmosG
from kosmos_g.models.mllm import MLLM, Resampler
from kosmos_g.models.prompt import parse_prompt

VOCAB = 32003


def tiny_mllm_config(**vision) -> MLLMConfig:
    cfg = model_preset("tiny").mllm
    for key, value in vision.items():
        setattr(cfg.vision, key, value)
    return cfg


def test_vision_tokens_and_resampler_shapes():
    torch.manual_seed(0)
    mllm = MLLM(tiny_mllm_config(), VOCAB)
    pixels = torch.randn(3, 3, 32, 32)
    tokens = mllm.vision(pixels)
    assert tokens.shape == (3, 1 + (32 // 8) ** 2, 64)  # class token + all patches
    assert mllm.resampler(tokens).shape == (3, 4, 64)
    big = Resampler(input_dim=1024, dim=128, num_latents=64, num_heads=8)
    assert big(torch.randn(2, 257, 1024)).shape == (2, 64, 128)


def test_decoder_is_causal_and_images_fill_their_slots(tiny_model, photos):
    tok, mllm = tiny_model.tokenizer, tiny_model.mllm
    a = tok([parse_prompt("look <i> at this cat", [photos[0]])])
    b = tok([parse_prompt("look <i> at this cat", [photos[1]])])
    c = tok([parse_prompt("look <i> at this dog", [photos[0]])])
    with torch.no_grad():
        ha, hb, hc = (mllm(x["input_ids"], x["attention_mask"], x["image_mask"], x["pixel_values"]).hidden_states
                      for x in (a, b, c))
    first_slot = int(a["image_mask"][0].nonzero()[0])
    # A different image changes its slots and everything after, nothing before.
    assert torch.allclose(ha[:, :first_slot], hb[:, :first_slot])
    assert not torch.allclose(ha[:, first_slot], hb[:, first_slot])
    assert not torch.allclose(ha[:, -1], hb[:, -1])
    # A different last word changes only its own position and later ones.
    changed = int((a["input_ids"] != c["input_ids"]).nonzero()[0, 1])
    assert torch.allclose(ha[:, :changed], hc[:, :changed], atol=1e-6)
    assert not torch.allclose(ha[:, changed], hc[:, changed])


def test_padding_does_not_change_valid_states(tiny_model):
    tok, mllm = tiny_model.tokenizer, tiny_model.mllm
    alone = tok(["a small cat"])
    padded = tok(["a small cat", "a much longer caption about a small cat on a mat"])
    n = alone["input_ids"].shape[1]
    with torch.no_grad():
        h1 = mllm(**{k: alone[k] for k in ("input_ids", "attention_mask", "image_mask", "pixel_values")}).hidden_states
        h2 = mllm(**{k: padded[k] for k in ("input_ids", "attention_mask", "image_mask", "pixel_values")}).hidden_states
    assert torch.allclose(h1[0], h2[0, :n], atol=1e-5)


def test_logits_cover_the_vocabulary(tiny_model):
    batch = tiny_model.tokenizer(["a cat"])
    out = tiny_model.mllm(batch["input_ids"], batch["attention_mask"], batch["image_mask"],
                          batch["pixel_values"], return_logits=True)
    assert out.logits.shape == (1, batch["input_ids"].shape[1], VOCAB)
    assert out.hidden_states.shape == (1, batch["input_ids"].shape[1], 64)


def test_slot_count_mismatch_is_an_error(tiny_model, photos):
    batch = tiny_model.tokenizer([parse_prompt("<i>", [photos[0]])])
    with pytest.raises(ValueError, match="image slots"):
        tiny_model.mllm(batch["input_ids"], batch["attention_mask"], batch["image_mask"], batch["pixel_values"][:0])


def test_only_last_clip_block_and_final_norm_train(fresh_tiny):
    fresh_tiny.set_stage(1)
    vision = fresh_tiny.mllm.vision.model
    trainable = {n for n, p in vision.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.layers.1.", "post_layernorm.")) for n in trainable)
    assert not any(p.requires_grad for p in vision.embeddings.parameters())
    assert not any(p.requires_grad for p in vision.encoder.layers[0].parameters())


def test_stage1_lm_loss_trains(fresh_tiny):
    model = fresh_tiny
    model.set_stage(1)
    model.train()
    batch = model.tokenizer(["a photo of a cat on a mat", "two dogs run in the park"])
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = model.lm_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first * 0.7


def test_pretrained_clip_directory_is_loaded(tmp_path, photos):
    """A CLIP checkpoint directory (full CLIPModel layout, as OpenAI's) feeds the vision encoder."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(1)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
        vision_config=dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                           image_size=32, patch_size=8, hidden_act="quick_gelu"),
    ))
    clip.save_pretrained(tmp_path / "clip")
    cfg = model_preset("tiny")
    cfg.mllm.vision = VisionConfig(pretrained_path=str(tmp_path / "clip"))  # shape fields: paper defaults
    model = KosmosG.from_config(cfg)
    vision = model.mllm.vision.model
    assert torch.equal(vision.encoder.layers[2].mlp.fc1.weight, clip.vision_model.encoder.layers[2].mlp.fc1.weight)
    # The config now describes the loaded encoder, and the tokenizer preprocesses at its size.
    assert (model.config.mllm.vision.hidden_size, model.config.mllm.vision.num_layers) == (48, 3)
    assert model.tokenizer.image_size == 32
    cond = model.encode_prompts([parse_prompt("a <i>", [photos[0]])])
    assert cond.shape == (1, 77, 32)


def test_gradient_checkpointing_gives_the_same_gradients(photos):
    grads = []
    for checkpointing in (False, True):
        cfg = model_preset("tiny")
        cfg.mllm.gradient_checkpointing = checkpointing
        torch.manual_seed(0)
        model = KosmosG.from_config(cfg).train()
        model.set_stage(1)
        model.lm_loss(model.tokenizer([parse_prompt("a <i> cat", [photos[1]])])).backward()
        grads.append(model.mllm.decoder.layers[0].ffn.fc1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
