"""Tiny random checkpoints of the construction pipeline's three model classes.

No real BLIP-2, MPT or CLIPSeg weights can be downloaded here, so tests and the `tiny`
preset build randomly initialised models of the same transformers classes from small
configs and save them with `save_pretrained` (plus their processors), exactly the
directory layout of the real checkpoints. The pipeline then loads them through the
path a user's real weights take (a local directory or an `s3://` prefix).

Tokenizers are built offline: a word-level vocabulary of the sample entities for the
two generators (so random outputs are real words and often name an entity), and
CLIP's real BPE vocabulary (shipped in open-clip-torch) for CLIPSeg.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from kosmos_g.platform import storage

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
IMAGE_SIZE = 32  # BLIP-2 vision input of the tiny captioner
SEGMENTER_SIZE = 64  # CLIPSeg input and mask resolution of the tiny segmenter


def vocabulary() -> list[str]:
    """Special tokens, punctuation, a few function words and the words of the sample
    set's hand-annotated entities. A vocabulary this small makes a random captioner and
    a random LLM share words often, so many images get entities and the whole path
    (segmentation, crops, shards) runs."""
    from kosmos_g.platform.data.samples import ENTITIES

    words = {w for entities in ENTITIES.values() for text, _ in entities for w in re.findall(r"[a-z'-]+", text)}
    return SPECIALS + [",", ".", "a", "the", "with", "and", "on"] + sorted(words)


def word_tokenizer():
    """A word-level fast tokenizer over `vocabulary()` that round-trips plain text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def build_captioner(directory: str | Path) -> Path:
    """Blip2ForConditionalGeneration (OPT text side) + Blip2Processor."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    tokenizer = word_tokenizer()
    processor = Blip2Processor(BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer,
                               num_query_tokens=4)  # adds the <image> token to the tokenizer
    vocab = len(tokenizer)
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 8},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "intermediate_size": 64, "vocab_size": vocab, "encoder_hidden_size": 32},
        text_config={"model_type": "opt", "vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 1,
                     "ffn_dim": 64, "num_attention_heads": 2, "word_embed_proj_dim": 32,
                     "max_position_embeddings": 128, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        num_query_tokens=4, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    return _save(directory, model, processor)


def build_entity_llm(directory: str | Path) -> Path:
    """MptForCausalLM (the paper used MPT-7B-Instruct) + its tokenizer."""
    import torch
    from transformers import MptConfig, MptForCausalLM

    tokenizer = word_tokenizer()
    config = MptConfig(d_model=32, n_heads=2, n_layers=1, expansion_ratio=2, max_seq_len=256,
                       vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return _save(directory, MptForCausalLM(config), tokenizer)


def build_segmenter(directory: str | Path) -> Path:
    """CLIPSegForImageSegmentation + CLIPSegProcessor with CLIP's real BPE vocabulary."""
    import torch
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    from kosmos_g.models.tokenizers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    processor = CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": SEGMENTER_SIZE, "width": SEGMENTER_SIZE}),
                                 tokenizer=tokenizer)
    config = CLIPSegConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": SEGMENTER_SIZE, "patch_size": 16},
        projection_dim=32, extract_layers=[0], reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    torch.manual_seed(0)
    return _save(directory, CLIPSegForImageSegmentation(config), processor)


def _save(directory: str | Path, model, processor) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


BUILDERS = {"captioner": build_captioner, "entity_llm": build_entity_llm, "segmenter": build_segmenter}


def write_tiny_models(targets: dict[str, str]) -> dict[str, str]:
    """Build the models named in `targets` ({"captioner": uri, ...}) and store each at its
    URI (local directory or s3:// prefix); returns `targets`."""
    for name, uri in targets.items():
        if storage.parse(uri).scheme == "file":
            BUILDERS[name](storage.parse(uri).path)
            continue
        with tempfile.TemporaryDirectory() as scratch:
            storage.upload_dir(BUILDERS[name](scratch), uri)
    return targets
