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


class OfficialTokenizer:
    """The released Kosmos-G vocabulary: SentencePiece pieces mapped through a fairseq dictionary.

    `vocab_dir` holds the release's `sentencepiece.bpe.model` and `dict.txt`. Ids follow fairseq:
    <s>=0, <pad>=1, </s>=2, <unk>=3, then dict.txt's entries in file order, then the symbols the
    released task appends (<mask>, </doc>, <image>, </image>, </chunk>, </line>): 64,007 in all.
    Text is split into pieces by SentencePiece and each piece is looked up (unknown -> <unk>),
    so the special symbols can never come out of user text.
    """

    FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
    TASK_SYMBOLS = ("<mask>", "</doc>", "<image>", "</image>", "</chunk>", "</line>")

    def __init__(self, vocab_dir: str | Path):
        root = Path(vocab_dir)
        model_file, dict_file = root / "sentencepiece.bpe.model", root / "dict.txt"
        missing = [str(f) for f in (model_file, dict_file) if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"official tokenizer: missing {', '.join(missing)} "
                                    "(the release's sentencepiece.bpe.model and dict.txt)")
        self.model_path = model_file
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.symbols = list(self.FAIRSEQ_SPECIALS)
        for number, line in enumerate(dict_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            piece = line.rsplit(" ", 1)[0] if " " in line else line
            if not piece:
                raise ValueError(f"{dict_file}:{number}: no symbol on this line")
            self.symbols.append(piece)
        for symbol in self.TASK_SYMBOLS:
            if symbol not in self.symbols:  # fairseq's add_symbol keeps an existing id
                self.symbols.append(symbol)
        self.index = {}
        for i, symbol in enumerate(self.symbols):
            self.index.setdefault(symbol, i)
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.boi_id, self.eoi_id = self.index["<image>"], self.index["</image>"]
        self.vocab_size = len(self.symbols)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(piece, self.unk_id) for piece in self.sp.encode(text, out_type=str)]

    def decode(self, ids: list[int]) -> str:
        pieces = [self.symbols[i] for i in ids if 4 <= i < len(self.symbols) and self.symbols[i] not in self.TASK_SYMBOLS]
        return self.sp.decode_pieces(pieces)


def build_text_tokenizer(config) -> "TextTokenizer | OfficialTokenizer":
    """The MLLM's text tokenizer for a TokenizerConfig (kind "sentencepiece" or "official")."""
    if config.kind == "official":
        if not config.vocab_dir:
            raise ValueError("tokenizer.kind 'official' needs tokenizer.vocab_dir: a folder with the "
                             "release's sentencepiece.bpe.model and dict.txt")
        return OfficialTokenizer(config.vocab_dir)
    if config.kind == "sentencepiece":
        return TextTokenizer(config.sentencepiece_path)
    raise ValueError(f"tokenizer.kind must be 'sentencepiece' or 'official', got {config.kind!r}")


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
