"""Held-out evaluation in the miniature world (platform/data/world.py): does an image inside the
prompt decide what the generated image shows?

Cases, all on the background a subject's colour never appears on in training
(`world.held_out_background`):

- `single`: `a <image> on a <b> background`, the subject (one object) shown on a third colour;
  scored by the generated largest object's colour and shape, and the background; how it fails:
  drawn in the subject image's background colour (`subject_background`), or with the subject's
  colour and the background exchanged (`swapped`).
- `pair`: `a <image> and a <image> on a <b> background`, `b` held out for the first subject;
  scored by whether both subjects' colours are present (objects drawn touching read as one object
  per colour; `both_apart`: present on objects apart, as the scorer read them before 2026-12-05),
  and the background; how it fails: with fewer than two objects drawn (`two_drawn` 0), or with
  one subject's colour on both (`copied_colour`).
- `text`: the text-only baseline `an object on a <b> background` for every single case, scored
  against the subject it never saw (identity should sit near chance: 1/8 colours, 1/4 shapes).
- `words` (when asked for): every single case told in words, `a red star on a <b> background`:
  text-to-image through the MLLM and AlignerNet. That is what the paper's Table 2 measures after
  stage 2 (AlignerNet against the decoder-only ablation, beside SD told the captions), and what
  stage 3 keeps of it; the frozen decoder told the same words is the reference.

Prompts follow the stage-3 training form, where an entity's words are replaced by its image
("a <image> on a blue background"). Every case has its own sampling seed, so two models evaluated
on the same cases start from the same noise. Subject images are the world's entity crops (the
ones stage 3 trains on, with their background kept), rendered deterministically from the seed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from kosmos_g.platform.data import imaging, world
from kosmos_g.platform.data.world_scorer import read_scene

KINDS = ("single", "pair", "text", "words")
IMAGE_KINDS = ("single", "pair")  # the kinds whose prompt shows the subject images
# What `score` reads from one image (a kind has a subset), in the order the scores table lists them.
HITS = ("colour", "shape", "both_colours", "both_apart", "two_drawn", "copied_colour", "background",
        "subject_background", "swapped")
DRAWN_SHAPES = (*world.SHAPES, "none")  # what `CaseReading.drawn_shape` reads: a shape, or nothing drawn
CHANCE = {"colour": 1 / len(world.COLOURS), "shape": 1 / len(world.SHAPES)}
# The hits averaged per held-out pairing too (`summarise`'s `_pairing_mean` metrics).
PAIRING_HITS = ("colour", "shape", "both_colours", "background", "swapped")
ASKED_BACKGROUND = re.compile(r"on an? (\w+) background")


@dataclass(frozen=True)
class Subject:
    colour: str
    shape: str
    shown_on: str  # the background of the subject image (neither its colour nor the target's)


@dataclass(frozen=True)
class WorldCase:
    key: str
    kind: str
    background: str  # what the text asks for
    subjects: tuple[Subject, ...]  # what the images show (the text-only case never shows them)
    seed: int

    @property
    def prompt(self) -> str:
        """The Kosmos-G prompt, one `<image>` slot per subject image."""
        if self.kind == "text":
            return f"an object on a {self.background} background"
        if self.kind == "words":
            return self.text
        return " and ".join("a <image>" for _ in self.subjects) + f" on a {self.background} background"

    @property
    def text(self) -> str:
        """The same request in words (CLIP-T's prompt)."""
        things = " and ".join(f"a {s.colour} {s.shape}" for s in self.subjects)
        return f"{things} on a {self.background} background"

    @property
    def shows_images(self) -> bool:
        return self.kind in IMAGE_KINDS


def to_json(case: WorldCase) -> str:
    return json.dumps(asdict(case))


def from_json(text: str) -> WorldCase:
    fields = json.loads(text)
    return WorldCase(**{**fields, "subjects": tuple(Subject(**s) for s in fields["subjects"])})


def _subject(rng: np.random.Generator, colour: str, target: str) -> Subject:
    third = [c for c in world.COLOURS if c not in (colour, target)]
    return Subject(colour, str(rng.choice(world.SHAPES)), str(rng.choice(third)))


def _case_key(kind: str, index: int, background: str, subjects: tuple[Subject, ...], seed: int) -> str:
    """`<kind>-<index>-<digest of what the case asks>`: generated images are kept by key and a
    rerun skips keys already drawn, so a key must not name another case when the counts change
    (the pairs are drawn after the singles). A text-only or words twin shares its case's digest."""
    content = json.dumps([background, [asdict(s) for s in subjects], seed])
    return f"{kind}-{index:04d}-{hashlib.blake2b(content.encode(), digest_size=3).hexdigest()}"


def cases(singles: int, pairs: int, seed: int = 0, words: bool = False) -> list[WorldCase]:
    """`singles` single-subject cases (each with its text-only twin, and with `words` its twin told
    in words) and `pairs` two-subject cases; the same cases with or without `words`."""
    rng = np.random.default_rng(seed)
    found: list[WorldCase] = []
    twins = ("single", "text", "words") if words else ("single", "text")
    for i in range(singles):
        colour = str(rng.choice(world.COLOURS))
        target = world.held_out_background(colour)
        subject = _subject(rng, colour, target)
        for kind in twins:
            found.append(WorldCase(_case_key(kind, i, target, (subject,), seed + i), kind, target, (subject,), seed + i))
    for i in range(pairs):
        first = str(rng.choice(world.COLOURS))
        target = world.held_out_background(first)
        second = str(rng.choice([c for c in world.COLOURS if c not in (first, target)]))
        subjects = (_subject(rng, first, target), _subject(rng, second, target))
        found.append(WorldCase(_case_key("pair", i, target, subjects, seed + singles + i), "pair", target, subjects,
                               seed + singles + i))
    return found


def subject_image(subject: Subject, seed: int, size: int = world.SIZE) -> Image.Image:
    """The subject as stage 3 sees an entity: its crop (background kept) from a rendered scene."""
    rng = np.random.default_rng(seed)
    side = int(rng.integers(world.MIN_OBJECT, world.MAX_OBJECT + 1))
    left, top = (int(v) for v in rng.integers(0, world.SIZE - side + 1, size=2))
    scene = world.Scene(subject.shown_on, (world.WorldObject(subject.colour, subject.shape,
                                                             (left, top, left + side, top + side)),))
    crop, _, _ = imaging.entity_crops(scene.render(), scene.mask(0), size)
    return crop


def answer_scene(case: WorldCase) -> world.Scene:
    """A scene that fulfils a single-subject case (its subject on the asked background; size and
    place drawn from the case's seed): what a perfect generation would show."""
    rng = np.random.default_rng(case.seed)
    side = int(rng.integers(world.MIN_OBJECT, world.MAX_OBJECT + 1))
    left, top = (int(v) for v in rng.integers(0, world.SIZE - side + 1, size=2))
    subject = case.subjects[0]
    return world.Scene(case.background, (world.WorldObject(subject.colour, subject.shape,
                                                           (left, top, left + side, top + side)),))


def subject_seed(case: WorldCase, index: int) -> int:
    return case.seed * 10 + index


def subject_uri(root: str, case: WorldCase, index: int) -> str:
    """Where subject image `index` of `case` is kept under `root` (named by what draws it, so a
    text-only or words twin, which shares its case's seed and subject, names the same file)."""
    from kosmos_g.platform import storage

    subject = case.subjects[index]
    return storage.join(root, f"{subject.colour}-{subject.shape}-on-{subject.shown_on}-{subject_seed(case, index)}.png")


@dataclass(frozen=True)
class CaseReading:
    hits: dict[str, float]  # 1.0 hit, 0.0 miss, for the `HITS` names of the case's kind
    drawn_shape: str  # the largest object's shape (what a single case's `shape` hit compares), or "none"


def score(case: WorldCase, image: Image.Image) -> dict[str, float]:
    """World-scorer hits of one generated image against its case (1.0 hit, 0.0 miss)."""
    return read_case(case, image).hits


def read_case(case: WorldCase, image: Image.Image) -> CaseReading:
    """One world-scorer reading of a generated image: its hits against the case and the shape drawn."""
    reading = read_scene(image)
    largest = _largest(reading)
    hits = {"background": float(reading.background == case.background)}
    if case.kind == "pair":
        present = {o.colour for o in reading.objects}
        hits["both_colours"] = float(all(s.colour in present for s in case.subjects))
        apart = {o.colour for o in read_scene(image, split_touching=False).objects}
        hits["both_apart"] = float(all(s.colour in apart for s in case.subjects))
        hits["colour"] = float(case.subjects[0].colour in present)
        # The two ways a pair fails: one object drawn, or two drawn with one subject's colour on
        # both (the other's lost: attributes leaking between subjects, not a wrong identity).
        hits["two_drawn"] = float(len(reading.objects) >= 2)
        drawn = [o.colour for o in reading.objects]
        hits["copied_colour"] = float(len(drawn) >= 2 and any(
            s.colour not in drawn and drawn.count(other.colour) >= 2
            for s, other in zip(case.subjects, reversed(case.subjects))))
    else:
        hits["colour"] = float(largest is not None and largest.colour == case.subjects[0].colour)
        hits["shape"] = float(largest is not None and largest.shape == case.subjects[0].shape)
        # The object drawn in the colour of the subject image's background: the model found the
        # crop's colours but not which of them is the object.
        hits["subject_background"] = float(largest is not None and largest.colour == case.subjects[0].shown_on)
        # The subject's colour and the asked background exchanged (`an orange star on a red
        # background` drawn red on orange): a pairing the training data holds, colour and background
        # read from the words but not bound to object and ground.
        hits["swapped"] = float(largest is not None and largest.colour == case.background
                                and reading.background == case.subjects[0].colour)
    return CaseReading(hits, largest.shape if largest is not None else "none")


def _largest(reading):
    return max(reading.objects, key=lambda o: o.area) if reading.objects else None


def shape_breakdown(cases: Sequence[WorldCase], drawn: dict[str, dict[str, str]]) -> dict[str, float]:
    """Where single-subject shapes are lost, as numbers. `drawn` maps a source's label to
    {case key: `CaseReading.drawn_shape`} (the first source is the model under study, e.g. the
    image-prompted Kosmos-G; a second, e.g. its decoder told the cases in words, is what it is paired with).
    Keys: `<label>/<shape>` hit rates per asked shape and `<label>/all`; `confusion/<asked>/<drawn>`
    case counts of the first source; with two sources `paired/<both|first_only|second_only|neither>`
    counts and `paired/first_given_second` (the first's rate where the second drew the shape) and
    `paired/first_without_second` (where it did not)."""
    singles = [c for c in cases if c.kind == "single" and all(c.key in d for d in drawn.values())]
    labels = list(drawn)
    right = {label: {c.key: drawn[label][c.key] == c.subjects[0].shape for c in singles} for label in labels}
    found: dict[str, float] = {"cases": float(len(singles))}
    for label in labels:
        for shape in (*world.SHAPES, "all"):
            chosen = [c.key for c in singles if shape == "all" or c.subjects[0].shape == shape]
            found[f"{label}/{shape}"] = float(np.mean([right[label][k] for k in chosen])) if chosen else float("nan")
    for asked in world.SHAPES:
        for shape in DRAWN_SHAPES:
            found[f"confusion/{asked}/{shape}"] = float(sum(
                c.subjects[0].shape == asked and drawn[labels[0]][c.key] == shape for c in singles))
    if len(labels) > 1:
        first, second = right[labels[0]], right[labels[1]]
        counts = {"both": sum(first[k] and second[k] for k in first),
                  "second_only": sum(second[k] and not first[k] for k in first),
                  "first_only": sum(first[k] and not second[k] for k in first)}
        counts["neither"] = len(first) - sum(counts.values())
        found.update({f"paired/{name}": float(n) for name, n in counts.items()})
        found["paired/first_given_second"] = counts["both"] / max(1, counts["both"] + counts["second_only"])
        found["paired/first_without_second"] = counts["first_only"] / max(1, counts["first_only"] + counts["neither"])
    return found


def shape_report(breakdown: dict[str, float], labels: Sequence[str]) -> list[str]:
    """`shape_breakdown` as markdown: per asked shape each source's rate, the first source's
    confusion (asked → drawn), and the pairing of the first two sources by case."""
    lines = ["| asked shape | cases | " + " | ".join(f"{label}: shape drawn" for label in labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for shape in (*world.SHAPES, "all"):
        cases = breakdown["cases"] if shape == "all" else sum(breakdown[f"confusion/{shape}/{d}"] for d in DRAWN_SHAPES)
        lines.append(f"| {shape} | {cases:.0f} | " + " | ".join(f"{breakdown[f'{label}/{shape}']:.2f}"
                                                              for label in labels) + " |")
    lines += ["", f"What {labels[0]} draws for each asked shape (cases):", "",
              "| asked | " + " | ".join(f"drawn {d}" for d in DRAWN_SHAPES) + " |", "|---|" + "---|" * len(DRAWN_SHAPES)]
    for asked in world.SHAPES:
        lines.append(f"| {asked} | " + " | ".join(f"{breakdown[f'confusion/{asked}/{d}']:.0f}" for d in DRAWN_SHAPES)
                     + " |")
    if "paired/both" in breakdown:
        b = {k.removeprefix("paired/"): v for k, v in breakdown.items() if k.startswith("paired/")}
        lines += ["", f"Paired by case: both draw the shape in {b['both']:.0f}, only {labels[1]} in "
                  f"{b['second_only']:.0f}, only {labels[0]} in {b['first_only']:.0f}, neither in {b['neither']:.0f}. "
                  f"Where {labels[1]} draws the shape, {labels[0]} does in {b['first_given_second']:.2f}; where it "
                  f"does not, in {b['first_without_second']:.2f}."]
    return lines


def summarise(scores: Sequence[dict]) -> dict[str, float]:
    """`world_<kind>_<metric>` means over {kind, colour, shape?, both_colours?, background, clip_i?,
    clip_t} rows, and `world_<kind>_images` counts; where the rows carry their `prompt`, also
    `world_<kind>_<hit>_pairing_mean`, the mean over held-out pairings (`by_pairing`)."""
    metrics: dict[str, float] = {}
    for kind in KINDS:
        rows = [s for s in scores if s["kind"] == kind]
        if not rows:
            continue
        metrics[f"world_{kind}_images"] = float(len(rows))
        for name in (*HITS, "clip_i", "clip_t"):
            values = [v for v in (hit_value(r.get(name)) for r in rows) if v is not None]
            if values:
                metrics[f"world_{kind}_{name}"] = float(np.mean(values))
        if all("prompt" in r for r in rows):
            rates = by_pairing(rows)
            for name in PAIRING_HITS:
                per_pairing = [hits[name] for hits in rates.values() if name in hits]
                if per_pairing:
                    metrics[f"world_{kind}_{name}_pairing_mean"] = float(np.mean(per_pairing))
    return metrics


def pairing(prompt: str) -> str:
    """The held-out pairing a case tests, `yellow on white`, read from its prompt. Every kind asks
    for the background its (first) subject's colour never appears on in training, and that
    background names the colour (`world.held_out_background` is one-to-one)."""
    asked = ASKED_BACKGROUND.search(prompt)
    if asked is None or asked.group(1) not in world.COLOURS:
        raise ValueError(f"no palette background asked for in {prompt!r}")
    return pairing_name(next(c for c in world.COLOURS if world.held_out_background(c) == asked.group(1)))


def pairing_name(colour: str) -> str:
    """`yellow on white`: a subject colour on the background it is held out from."""
    return f"{colour} on {world.held_out_background(colour)}"


def by_pairing(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """{pairing: {"cases": n, <hit>: rate}} over score rows (each with its `prompt`), pairings in
    palette order. The world holds out eight pairings, one per subject colour, and a model tends to
    bind a pairing or not as a whole, so the cases of one pairing do not vary independently: these
    rates say which pairings a model has, and their mean weighs each pairing once, whatever share
    of the cases a seeded draw gave it."""
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(pairing(row["prompt"]), []).append(row)
    found = {}
    for name in map(pairing_name, world.COLOURS):
        if name not in grouped:
            continue
        found[name] = {"cases": float(len(grouped[name]))}
        for hit in PAIRING_HITS:
            values = [v for v in (hit_value(r.get(hit)) for r in grouped[name]) if v is not None]
            if values:
                found[name][hit] = float(np.mean(values))
    return found


def rate_interval(rate: float, cases: float, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% at the default z) around a hit rate measured on `cases`:
    what the evaluation's sampling alone leaves open, so a target met by three cases of 200 reads
    as the near thing it is. It says nothing of the spread between training seeds."""
    if cases <= 0:
        return 0.0, 1.0
    spread = z * z / cases
    centre = (rate + spread / 2) / (1 + spread)
    half = z * np.sqrt(rate * (1 - rate) / cases + spread / (4 * cases)) / (1 + spread)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def hit_value(value) -> float | None:
    """A hit (or CLIP score) as a number, from a score row or its line in `world/scores.csv` (None:
    not scored)."""
    if value is None or value == "":
        return None
    number = float(value)
    return None if np.isnan(number) else number


def sample_grid(scores: Sequence[dict], per_kind: int = 4) -> Image.Image:
    """Subject image(s) → generated image with the prompt, the first `per_kind` cases of each kind."""
    from kosmos_g.platform.evaluation.grid import open_image, prompt_grid

    shown = []
    for kind in KINDS:
        for row in sorted((s for s in scores if s["kind"] == kind), key=lambda s: s["key"])[:per_kind]:
            references = [open_image(uri) for uri in json.loads(row["references"])]
            shown.append({"text": row["prompt"] if kind in IMAGE_KINDS else f"{row['prompt']} (subject not shown)",
                          "references": references, "generated": open_image(row["image_uri"])})
    return prompt_grid(shown, max_references=2)
