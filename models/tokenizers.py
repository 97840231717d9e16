"""Text tokenizers: the MLLM's SentencePiece model and the CLIP BPE tokenizer of the teacher.

Both use real vocabularies that ship inside installed packages, so nothing is downloaded:
SentencePiece from `mistral-common` (tokenizer.model.v1, 32,000 pieces) and CLIP's BPE
merges from `open-clip-torch` (bpe_simple_vocab_16e6.txt.gz).
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
from pathlib import Path

import sentencepiece

SPECIAL_TOKENS = ("<image>", "</image>", "<pad>")


def shipped_sentencepiece_path() -> Path:
    path = Path(
        importlib.metadata.distribution("mistral_common").locate_file(
            "mistral_common/data/tokenizer.model.v1"
        )
    )
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common's SentencePiece model is missing at {path}")
    return path


def shipped_clip_bpe_path() -> Path:
    # Located through package metadata: importing open_clip itself would require torchvision.
    path = Path(
        importlib.metadata.distribution("open_clip_torch").locate_file(
            "open_clip/bpe_simple_vocab_16e6.txt.gz"
        )
    )
    if not path.is_file():
        raise FileNotFoundError(f"open-clip-torch's BPE vocabulary is missing at {path}")
    return path


class TextTokenizer:
    """SentencePiece text tokenizer with `<image>`, `</image>` and `<pad>` appended as ids.

    The special ids sit after the SentencePiece pieces and are never produced by encoding
    text, so a user typing "<image>" cannot forge an image boundary.
    """

    def __init__(self, model_path: str | Path | None = None):
        self.model_path = Path(model_path) if model_path else shipped_sentencepiece_path()
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_path))
        n = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{self.model_path}: SentencePiece model lacks <s> or </s>")
        self.boi_id, self.eoi_id, self.pad_id = n, n + 1, n + 2
        self.vocab_size = n + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i < self.sp.get_piece_size()])


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable character table, in vocabulary order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@functools.lru_cache(maxsize=4)
def _clip_vocab_and_merges(bpe_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    # CLIP uses the first 49,152 - 256 - 2 merges (after the version header line).
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = _bytes_to_unicode()
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(bpe_path: str | Path | None = None, max_length: int = 77):
    """transformers `CLIPTokenizer` (49,408 tokens) built from CLIP's BPE merges file."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges(str(bpe_path or shipped_clip_bpe_path()))
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
