"""The three model stages of the compositional-data construction (paper section 3.1):
captioner (BLIP-2) -> entity extraction (instruction-tuned LLM) -> text-prompted
segmentation (CLIPSeg). Each class is a Ray Data `map_batches` UDF run in an actor
pool: the model loads once per actor from a local directory or an `s3://` prefix
(cached locally by `storage.local_dir`), on the GPU in half precision when the actor
has one.

Batches are pyarrow tables; each stage adds columns, and drops (and counts) the rows
that cannot go further.
"""

from __future__ import annotations

import re
import numpy as np
import pyarrow as pa

from kosmos_g.platform.data import imaging, shards
from kosmos_g.platform import storage
from kosmos_g.platform.data.examples import key_hash
from kosmos_g.platform.data.skips import SkipRecorder

# Words that never make an entity on their own (a span is trimmed of them at both ends).
STOP_WORDS = frozenset(
    "a an the of with and or in on at to for from by is are was were it its this that these those "
    "there their his her near next beside behind front some two three several other full".split()
)
ENTITY_SPAN = pa.struct([("text", pa.string()), ("start", pa.int32()), ("end", pa.int32())])


def _device_and_dtype():
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def local_model_dir(uri: str) -> str:
    """A local directory for a model given as a path or a storage URI."""
    return str(storage.local_dir(uri))


def _images(table: pa.Table) -> list:
    return [imaging.decode_image(data) for data in table.column("image").to_pylist()]


class Captioner:
    """Adds `caption`: BLIP-2 (any image-text-to-text model) captions of `image`."""

    def __init__(self, model: str, prompt: str = "", max_new_tokens: int = 30, no_repeat_ngram_size: int = 0):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = local_model_dir(model)
        self.device, dtype = _device_and_dtype()
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.prompt = prompt
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False,
                                "no_repeat_ngram_size": no_repeat_ngram_size}
        self.torch = torch

    def __call__(self, table: pa.Table) -> pa.Table:
        images = _images(table)
        inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with self.torch.inference_mode():
            output = self.model.generate(**inputs, **self.generate_kwargs)
        # Generation returns prompt + continuation; keep the continuation.
        new_tokens = output[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else output
        captions = [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        return table.append_column("caption", pa.array(captions, pa.string()))


def _find_span(words: list[str], caption: str) -> tuple[int, int] | None:
    pattern = r"\b" + r"\s+".join(re.escape(w) for w in words) + r"\b"
    match = re.search(pattern, caption, flags=re.IGNORECASE)
    return (match.start(), match.end()) if match else None


def _trim(words: list[str]) -> list[str]:
    while words and words[0] in STOP_WORDS:
        words = words[1:]
    while words and words[-1] in STOP_WORDS:
        words = words[:-1]
    return words


def parse_entities(output: str, caption: str, max_entities: int = 8) -> list[tuple[int, int]]:
    """Character spans in `caption` of the entities an LLM listed in `output`.

    The output is split at commas, semicolons, newlines, list numbers and "and"; of each
    candidate, the longest run of its words (trimmed of stop words) that occurs in the
    caption is taken, so "a red car" still matches a caption saying "red car". Spans
    are returned in caption order without overlaps (longer spans win)."""
    spans: list[tuple[int, int]] = []
    for candidate in re.split(r"[,;\n]|\band\b|\d+[.)]", output, flags=re.IGNORECASE):
        words = re.findall(r"[\w'-]+", candidate.lower())
        found = None
        for length in range(len(words), 0, -1):
            for start in range(len(words) - length + 1):
                run = _trim(words[start:start + length])
                if run and len(run) == length and (found := _find_span(run, caption)):
                    break
            if found:
                break
        if found:
            spans.append(found)
    chosen: list[tuple[int, int]] = []
    for span in sorted(set(spans), key=lambda s: (s[0] - s[1], s[0])):  # longest first
        if all(span[1] <= other[0] or span[0] >= other[1] for other in chosen):
            chosen.append(span)
    return sorted(chosen)[:max_entities]


class EntityExtractor:
    """Adds `entities` (text + span in the caption) from an instruction-tuned causal LM;
    rows without any entity are dropped and counted as `no_entities`."""

    def __init__(self, model: str, prompt: str, max_new_tokens: int = 48, no_repeat_ngram_size: int = 0,
                 max_entities: int = 8, do_sample: bool = False, seed: int = 0, counter: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = local_model_dir(model)
        self.device, dtype = _device_and_dtype()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # decoder-only batch generation continues on the right
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.prompt, self.max_entities = prompt, max_entities
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                "no_repeat_ngram_size": no_repeat_ngram_size,
                                "pad_token_id": self.tokenizer.pad_token_id}
        self.seed = seed
        self.skips = SkipRecorder(counter)
        self.torch = torch

    def _prompts(self, captions: list[str]) -> list[str]:
        prompts = [self.prompt.format(caption=caption) for caption in captions]
        if getattr(self.tokenizer, "chat_template", None):
            prompts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                          add_generation_prompt=True) for p in prompts]
        return prompts

    def answers(self, table: pa.Table, captions: list[str]) -> list[str]:
        """The LLM's answer (a list of entities, in words) for each caption."""
        inputs = self.tokenizer(self._prompts(captions), return_tensors="pt", padding=True).to(self.device)
        if self.generate_kwargs["do_sample"]:
            # Seeded by the batch's content: the same batch samples the same answers on a re-run.
            self.torch.manual_seed(key_hash(self.seed, *table.column("key").to_pylist()) % 2**63)
        with self.torch.inference_mode():
            output = self.model.generate(**inputs, **self.generate_kwargs)
        return self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, table: pa.Table) -> pa.Table:
        captions = table.column("caption").to_pylist()
        keep, entities = [], []
        for index, (caption, answer) in enumerate(zip(captions, self.answers(table, captions))):
            spans = parse_entities(answer, caption, self.max_entities) if caption else []
            if spans:
                keep.append(index)
                entities.append([{"text": caption[s:e], "start": s, "end": e} for s, e in spans])
        self.skips.record({"no_entities": len(captions) - len(keep)})
        kept = table.take(pa.array(keep, pa.int64()))
        return kept.append_column("entities", pa.array(entities, pa.list_(ENTITY_SPAN)))


class Segmenter:
    """Segments every entity with CLIPSeg and writes the two crops; output rows follow
    the compositional shard schema. Entities whose mask (probability > threshold) covers
    less than `min_area` of the image are dropped; rows left without entities are
    dropped and counted as `empty_mask`."""

    def __init__(self, model: str, threshold: float = 0.3, min_area: float = 0.01, crop_size: int = 512,
                 with_background: bool = True, without_background: bool = True, fill: int = 255,
                 margin: float = 0.05, batch_size: int = 16, jpeg_quality: int = 95, counter: str | None = None,
                 image_format: str = "JPEG"):
        self.threshold, self.min_area, self.crop_size = threshold, min_area, crop_size
        self.variants = (with_background, without_background)
        self.fill, self.margin, self.batch_size, self.quality = fill, margin, batch_size, jpeg_quality
        self.image_format = image_format
        self.skips = SkipRecorder(counter)
        self.load(model)

    def load(self, model: str) -> None:
        import torch
        from transformers import AutoProcessor, CLIPSegForImageSegmentation

        path = local_model_dir(model)
        self.device, dtype = _device_and_dtype()
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = CLIPSegForImageSegmentation.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.torch = torch

    def probabilities(self, image, texts: list[str]) -> np.ndarray:
        """(len(texts), H, W) mask probabilities at the image's own resolution."""
        from PIL import Image

        maps = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            inputs = self.processor(text=chunk, images=[image] * len(chunk), return_tensors="pt", padding=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with self.torch.inference_mode():
                logits = self.model(**inputs).logits
            probs = self.torch.sigmoid(logits.float()).reshape(len(chunk), *logits.shape[-2:]).cpu().numpy()
            maps.extend(np.asarray(Image.fromarray(p).resize(image.size, Image.Resampling.BILINEAR)) for p in probs)
        return np.stack(maps)

    def _entity(self, image, entity: dict, probability: np.ndarray) -> dict | None:
        mask = probability > self.threshold
        area = float(mask.mean())
        if area < self.min_area:
            return None
        crop, crop_nobg, box = imaging.entity_crops(image, mask, self.crop_size, self.fill, self.margin)
        encode = lambda im: imaging.encode_image(im, self.image_format, quality=self.quality)  # noqa: E731
        return {**entity, "box": list(box), "area": area,
                "crop": encode(crop) if self.variants[0] else None,
                "crop_nobg": encode(crop_nobg) if self.variants[1] else None}

    def __call__(self, table: pa.Table) -> pa.Table:
        rows, empty = [], 0
        for row in table.to_pylist():
            image = imaging.decode_image(row["image"])
            probabilities = self.probabilities(image, [e["text"] for e in row["entities"]])
            entities = [record for entity, probability in zip(row["entities"], probabilities)
                        if (record := self._entity(image, entity, probability)) is not None]
            if not entities:
                empty += 1
                continue
            rows.append({"key": row["key"], "caption": row["caption"], "image": row["image"],
                         "width": row["width"], "height": row["height"], "entities": entities})
        self.skips.record({"empty_mask": empty})
        return shards.to_table("compositional", rows)


def decode_inputs(table: pa.Table, root: str, max_side: int, quality: int, counter: str | None,
                  image_format: str = "JPEG") -> pa.Table:
    """Ray Data task UDF over `read_binary_files` rows (bytes, path): decode, downscale to
    `max_side`, re-encode (JPEG, or PNG where exact colours matter); undecodable files are dropped and counted as
    `decode_error`. The key is the path relative to the input prefix (stable on re-runs)."""
    rows, failed = [], 0
    for data, path in zip(table.column("bytes").to_pylist(), table.column("path").to_pylist()):
        try:
            image = imaging.limit_side(imaging.decode_image(data), max_side)
        except imaging.ImageDecodeError:
            failed += 1
            continue
        key = path[len(root):].lstrip("/") if path.startswith(root) else path
        rows.append({"key": key, "image": imaging.encode_image(image, image_format, quality=quality),
                     "width": image.size[0], "height": image.size[1]})
    SkipRecorder(counter).record({"decode_error": failed})
    schema = pa.schema([("key", pa.string()), ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32())])
    return pa.Table.from_pylist(rows, schema=schema)
