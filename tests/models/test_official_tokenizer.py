"""The released vocabulary (sentencepiece.bpe.model + fairseq dict.txt), read from the
reference copy beside the checkout; the files are never part of this repository."""

from __future__ import annotations

from pathlib import Path

import pytest

from kosmos_g.models.config import OFFICIAL_VOCAB_SIZE, TokenizerConfig, model_preset
from kosmos_g.models.prompt import InterleavedTokenizer
from kosmos_g.models.tokenizers import OfficialTokenizer, build_text_tokenizer

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "official"

needs_files = pytest.mark.skipif(
    not (OFFICIAL / "dict.txt").is_file(),
    reason=f"the release's vocabulary files are not at {OFFICIAL} (../shared/reference/official/)",
)


@pytest.fixture(scope="module")
def official() -> OfficialTokenizer:
    return OfficialTokenizer(OFFICIAL)


@needs_files
def test_fairseq_dictionary_order(official):
    lines = (OFFICIAL / "dict.txt").read_text(encoding="utf-8").splitlines()
    assert official.vocab_size == OFFICIAL_VOCAB_SIZE == 4 + len(lines) + 6
    assert (official.bos_id, official.pad_id, official.eos_id, official.unk_id) == (0, 1, 2, 3)
    # dict.txt line i (0-based) is id 4 + i.
    for i in (0, 1, 100, len(lines) - 1):
        assert official.index[lines[i].rsplit(" ", 1)[0]] == 4 + i
    assert (official.boi_id, official.eoi_id) == (64_003, 64_004)


@needs_files
def test_encoding_maps_pieces_through_the_dictionary(official):
    ids = official.encode("a photo of a dog on the beach")
    pieces = official.sp.encode("a photo of a dog on the beach", out_type=str)
    assert ids == [official.index[p] for p in pieces] and official.unk_id not in ids
    assert official.decode(ids) == "a photo of a dog on the beach"
    # Typing the markers as text never produces the image-boundary ids.
    typed = official.encode("<image> </image>")
    assert official.boi_id not in typed and official.eoi_id not in typed


@needs_files
def test_interleaved_prompts_use_the_official_ids():
    cfg = TokenizerConfig(kind="official", vocab_dir=str(OFFICIAL), max_length=128)
    tok = InterleavedTokenizer(cfg, image_tokens=4, image_size=32)
    import numpy as np

    example = tok.encode(["a photo of", np.zeros((40, 40, 3), np.uint8), "on the beach"])
    ids = example["input_ids"].tolist()
    assert ids[0] == 0 and ids[-1] == 2 and ids.count(64_003) == 1 and ids.count(64_004) == 1
    assert tok.vocab_size == OFFICIAL_VOCAB_SIZE


def test_paper_preset_selects_the_official_vocabulary():
    cfg = model_preset("paper")
    assert cfg.tokenizer.kind == "official" and cfg.mllm.vocab_size == OFFICIAL_VOCAB_SIZE
    assert model_preset("tiny").tokenizer.kind == "sentencepiece"  # Mistral's, shipped offline
    with pytest.raises(ValueError, match="vocab_dir"):
        build_text_tokenizer(cfg.tokenizer)
    with pytest.raises(ValueError, match="kind"):
        build_text_tokenizer(TokenizerConfig(kind="bpe"))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="dict.txt"):
        OfficialTokenizer(tmp_path)


@needs_files
def test_a_bundle_carries_its_vocabulary(tmp_path):
    """save_servable copies the official files into the bundle; a moved bundle decodes the
    same ids from its own copy (the original folder is not needed)."""
    import shutil

    import torch

    from kosmos_g.models.checkpoint import load_model, save_servable
    from kosmos_g.models.kosmos_g import KosmosG

    vocab = tmp_path / "vocab"
    shutil.copytree(OFFICIAL, vocab, ignore=shutil.ignore_patterns("*.py"))
    cfg = model_preset("tiny")
    cfg.tokenizer = TokenizerConfig(kind="official", vocab_dir=str(vocab), max_length=cfg.tokenizer.max_length)
    torch.manual_seed(0)
    model = KosmosG.from_config(cfg)
    bundle = save_servable(model, tmp_path / "bundle")
    assert sorted(p.name for p in (bundle / "tokenizer").iterdir()) == ["dict.txt", "sentencepiece.bpe.model"]
    moved = tmp_path / "elsewhere"
    shutil.move(str(bundle), moved)
    shutil.rmtree(vocab)
    loaded = load_model(moved)
    assert loaded.config.tokenizer.vocab_dir == str(moved / "tokenizer")
    text = "a photo of a dog on the beach"
    assert loaded.tokenizer.text.encode(text) == model.tokenizer.text.encode(text)
    with torch.no_grad():
        assert torch.allclose(loaded.eval().encode_prompts([text]), model.eval().encode_prompts([text]), atol=1e-5)


def test_a_bundle_of_the_shipped_vocabulary_copies_nothing(tmp_path):
    import torch

    from kosmos_g.models.checkpoint import save_servable
    from kosmos_g.models.kosmos_g import KosmosG

    torch.manual_seed(0)
    bundle = save_servable(KosmosG.from_config(model_preset("tiny")), tmp_path / "bundle")
    assert not (bundle / "tokenizer").exists()
