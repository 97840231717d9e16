"""Prompt parsing, the interleaved sequence layout, batching, tokenizers and image preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kosmos_g.models.config import TokenizerConfig
from kosmos_g.models.images import CLIP_MEAN, CLIP_STD, clip_preprocess, tensor_to_pil, vae_preprocess
from kosmos_g.models.prompt import BATCH_KEYS, InterleavedTokenizer, parse_prompt
from kosmos_g.models.tokenizers import TextTokenizer, build_clip_tokenizer, shipped_sentencepiece_path

K, S = 4, 32  # tiny preset: image slots per image, CLIP input side


@pytest.fixture(scope="module")
def tok() -> InterleavedTokenizer:
    return InterleavedTokenizer(TokenizerConfig(max_length=64), image_tokens=K, image_size=S)


def test_parse_prompt_puts_images_in_order(photos):
    dog, hat = photos[0], photos[1]
    segments = parse_prompt("a photo of <image> wearing <i>", [dog, hat])
    assert segments[0] == "a photo of" and segments[2] == "wearing"
    assert segments[1] is dog and segments[3] is hat
    assert parse_prompt("<i><i> two", [dog, hat])[:2] == [dog, hat]
    assert parse_prompt("just text") == ["just text"]


@pytest.mark.parametrize("text,n_images,placeholders", [("a <i> and <i>", 1, 2), ("a cat", 1, 0), ("<image>", 0, 1)])
def test_parse_prompt_count_mismatch_is_clear(photos, text, n_images, placeholders):
    with pytest.raises(ValueError, match=f"{placeholders} image placeholder.*but {n_images} image"):
        parse_prompt(text, photos[:n_images])


def test_shipped_sentencepiece_is_mistral_v1():
    text = TextTokenizer()
    assert text.model_path == shipped_sentencepiece_path()
    assert text.sp.get_piece_size() == 32000
    assert (text.bos_id, text.eos_id) == (1, 2)
    assert text.encode("a photo of") == [264, 8428, 302]
    assert (text.boi_id, text.eoi_id, text.pad_id, text.vocab_size) == (32000, 32001, 32002, 32003)


def test_user_sentencepiece_model(tmp_path):
    import sentencepiece

    sentences = [f"the {c} cat sat on the {d} mat number {i}" for i, (c, d) in
                 enumerate(zip(["red", "blue", "green", "black"] * 25, ["big", "small", "old", "new"] * 25))]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(tmp_path / "own"), vocab_size=40, minloglevel=2,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )
    tok = InterleavedTokenizer(TokenizerConfig(sentencepiece_path=str(tmp_path / "own.model"), max_length=64), K, S)
    assert tok.vocab_size == 43 and tok.boi_id == 40
    ids = tok.encode("the red cat")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "the red cat"


def test_clip_tokenizer_is_the_real_bpe():
    clip = build_clip_tokenizer()
    assert len(clip) == 49408
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = clip(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert padded.shape == (1, 77) and padded[0, -1] == 49407


def test_sequence_layout(tok, photos):
    ex = tok.encode(parse_prompt("a photo of <i> wearing <i>", photos[:2]))
    ids = ex["input_ids"].tolist()
    words = tok.text.encode("a photo of")
    wearing = tok.text.encode("wearing")
    slots = [tok.pad_id] * K
    assert ids == ([tok.bos_id] + words + [tok.boi_id] + slots + [tok.eoi_id] + wearing
                   + [tok.boi_id] + slots + [tok.eoi_id] + [tok.eos_id])
    assert ex["image_mask"].sum() == 2 * K
    assert np.array_equal(np.flatnonzero(ex["image_mask"])[:K], np.arange(len(words) + 2, len(words) + 2 + K))
    # Loss targets: text and </s>; never <s>, <image>, slots, </image>.
    targets = [i for i, m in zip(ids, ex["loss_mask"]) if m]
    assert targets == words + wearing + [tok.eos_id]
    assert ex["pixel_values"].shape == (2, 3, S, S)


def test_collate_contract(tok, photos):
    batch = tok([parse_prompt("<i> then <i>", photos[:2]), "only text here", parse_prompt("x <i>", [photos[2]])])
    assert set(batch) == set(BATCH_KEYS)
    b, length = batch["input_ids"].shape
    assert b == 3 and batch["input_ids"].dtype == torch.long
    for key in ("attention_mask", "image_mask", "loss_mask"):
        assert batch[key].shape == (b, length) and batch[key].dtype == torch.bool
    assert batch["pixel_values"].shape == (3, 3, S, S) and batch["pixel_values"].dtype == torch.float32
    row = batch["attention_mask"][1]
    assert (batch["input_ids"][1][~row] == tok.pad_id).all()
    assert not (batch["loss_mask"] & ~batch["attention_mask"]).any()
    assert not (batch["loss_mask"] & batch["image_mask"]).any()
    # Images are stacked in order of appearance: row 0's two, then row 2's one.
    assert torch.allclose(batch["pixel_values"][2], clip_preprocess(photos[2], S))
    assert torch.allclose(batch["pixel_values"][1], clip_preprocess(photos[1], S))


def test_text_only_batch_has_empty_pixels(tok):
    batch = tok(["a cat", "two dogs playing"])
    assert batch["pixel_values"].shape == (0, 3, S, S)
    assert not batch["image_mask"].any()


def test_truncation_keeps_eos_and_whole_images(photos):
    tok = InterleavedTokenizer(TokenizerConfig(max_length=12), image_tokens=K, image_size=S)
    ex = tok.encode(["one two three", photos[0], "four " * 20, photos[1]])
    ids = ex["input_ids"]
    assert len(ids) == 12 and ids[-1] == tok.eos_id
    assert ex["image_mask"].sum() == K and ex["pixel_values"].shape[0] == 1
    ex = tok.encode(["word " * 5, photos[0]])  # the image no longer fits: dropped whole
    assert ex["image_mask"].sum() == 0 and ex["pixel_values"].shape[0] == 0 and ex["input_ids"][-1] == tok.eos_id


def test_collate_rejects_slot_image_mismatch(tok, photos):
    ex = tok.encode(["a", photos[0]])
    ex["pixel_values"] = ex["pixel_values"][:0]
    with pytest.raises(ValueError, match="image slots"):
        tok.collate([ex])


def test_image_inputs_pil_and_numpy_agree(photos):
    array = photos[1]
    from_np = clip_preprocess(array, 224)
    from_pil = clip_preprocess(Image.fromarray(array), 224)
    assert from_np.shape == (3, 224, 224) and torch.equal(from_np, from_pil)
    gray = clip_preprocess(array.mean(axis=2).astype(np.uint8), 224)
    assert gray.shape == (3, 224, 224)
    with pytest.raises(TypeError, match="uint8"):
        clip_preprocess(array.astype(np.float32), 224)


def test_clip_normalisation_and_vae_range():
    white = np.full((10, 20, 3), 255, dtype=np.uint8)
    x = clip_preprocess(white, 8)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[:, 0, 0], expected)
    v = vae_preprocess(np.zeros((16, 16, 3), np.uint8), 16)
    assert v.min() == -1 and v.max() == -1
    assert tensor_to_pil(vae_preprocess(white, 16)).getpixel((3, 3)) == (255, 255, 255)
