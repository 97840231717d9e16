"""The miniature world's stand-ins for the three construction models (docs/REPRODUCTION.md), used
by `pipelines/construct.py --preset world`: the same Ray Data stages and shard rows as with BLIP-2,
the LLM and CLIPSeg, where the scene's ground truth (read back exactly from its pixels) answers.

- `WorldCaptioner`: the caption the world writes for a scene ("a red circle and a yellow star on
  a blue background", objects left to right), from the world scorer's reading of the image.
- `WorldEntityParser`: the instruction LLM's answer replaced by parsing the caption's grammar (the
  "a <colour> <shape>" phrases before "on a"); the answer then goes through the same
  `parse_entities` as an LLM's, and rows without entities are dropped and counted the same way.
- `WorldSegmenter`: CLIPSeg's probability maps replaced by the scorer's exact object regions;
  thresholding, the two crops and the compositional rows are `Segmenter`'s own code.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kosmos_g.pipelines.construct_models import EntityExtractor, Segmenter, _images
from kosmos_g.platform.data.skips import SkipRecorder
from kosmos_g.platform.data.world_scorer import read_regions, read_scene

STAND_IN = "world"  # the model name that selects these classes in ConstructConfig.models


def caption_of(image) -> str:
    """The world's caption of a scene read from its pixels ("" when no object is read)."""
    reading = read_scene(image)
    if not reading.objects:
        return ""
    things = " and ".join(f"a {obj.colour} {obj.shape}" for obj in reading.objects)
    return f"{things} on a {reading.background} background"


def parse_caption(caption: str) -> str:
    """The entity list an LLM would answer for a world caption, by its grammar."""
    objects = caption.rsplit(" on a ", 1)[0] if " on a " in caption else ""
    phrases = [part.strip().removeprefix("a ").strip() for part in objects.split(" and ")]
    return ", ".join(phrase for phrase in phrases if phrase)


class WorldCaptioner:
    def __init__(self, **_unused):
        pass

    def __call__(self, table: pa.Table) -> pa.Table:
        captions = [caption_of(image) for image in _images(table)]
        return table.append_column("caption", pa.array(captions, pa.string()))


class WorldEntityParser(EntityExtractor):
    def __init__(self, max_entities: int = 8, counter: str | None = None, **_unused):
        self.max_entities = max_entities
        self.skips = SkipRecorder(counter)

    def answers(self, table: pa.Table, captions: list[str]) -> list[str]:
        return [parse_caption(caption) for caption in captions]


class WorldSegmenter(Segmenter):
    def load(self, model: str) -> None:
        pass  # the pixels are the segmenter

    def probabilities(self, image, texts: list[str]) -> np.ndarray:
        """1 inside the region of the object each text names (the n-th "red circle" of the text
        is the n-th red circle from the left), 0 elsewhere; all 0 when there is none."""
        _, regions = read_regions(image)
        taken: set[int] = set()
        maps = []
        for text in texts:
            match = next((i for i, (obj, _) in enumerate(regions)
                          if i not in taken and f"{obj.colour} {obj.shape}" == text.lower().strip()), None)
            if match is None:
                maps.append(np.zeros(image.size[::-1], dtype=np.float32))
            else:
                taken.add(match)
                maps.append(regions[match][1].astype(np.float32))
        return np.stack(maps) if maps else np.zeros((0, *image.size[::-1]), dtype=np.float32)


# ModelsConfig field -> its stand-in, for the fields set to STAND_IN.
STAND_INS = {"captioner": WorldCaptioner, "entity_llm": WorldEntityParser, "segmenter": WorldSegmenter}
