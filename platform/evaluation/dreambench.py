"""DreamBench (Ruiz et al., 2023) as Kosmos-G evaluates it (paper section 4.1).

30 subjects, each a folder of 4-6 photographs. Every reference image is paired with the 25
prompts of its kind (objects or live subjects); Kosmos-G is given its own variant of each prompt
with the subject as `<class> <image>`, and CLIP-T scores the generated image against the plain
prompt with the class noun in the subject's place. Values as in the official release.
"""

from __future__ import annotations

from dataclasses import dataclass

# subject folder -> (class noun, is a live subject)
SUBJECTS: dict[str, tuple[str, bool]] = {
    "backpack": ("backpack", False),
    "backpack_dog": ("backpack", False),
    "bear_plushie": ("stuffed animal", False),
    "berry_bowl": ("bowl", False),
    "can": ("can", False),
    "candle": ("candle", False),
    "clock": ("clock", False),
    "colorful_sneaker": ("sneaker", False),
    "duck_toy": ("toy", False),
    "fancy_boot": ("boot", False),
    "grey_sloth_plushie": ("stuffed animal", False),
    "monster_toy": ("toy", False),
    "pink_sunglasses": ("glasses", False),
    "poop_emoji": ("toy", False),
    "rc_car": ("toy", False),
    "red_cartoon": ("cartoon", False),
    "robot_toy": ("toy", False),
    "shiny_sneaker": ("sneaker", False),
    "teapot": ("teapot", False),
    "vase": ("vase", False),
    "wolf_plushie": ("stuffed animal", False),
    "cat": ("cat", True),
    "cat2": ("cat", True),
    "dog": ("dog", True),
    "dog2": ("dog", True),
    "dog3": ("dog", True),
    "dog5": ("dog", True),
    "dog6": ("dog", True),
    "dog7": ("dog", True),
    "dog8": ("dog", True),
}

OBJECT_PROMPTS = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)

LIVE_PROMPTS = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)

# Kosmos-G's input variants: "{}" becomes "<class> <image>" (the subject image in the prompt).
KOSMOSG_OBJECT_PROMPTS = (
    "{} in the jungle",
    "{} in the snow",
    "{} on the beach",
    "{} on a cobblestone street",
    "{} on top of pink fabric",
    "{} on top of a wooden floor",
    "{} with a city in the background",
    "{} with a mountain in the background",
    "{} with a blue house in the background",
    "{} on top of a purple rug in a forest",
    "{} with a wheat field in the background",
    "{} with a tree and autumn leaves in the background",
    "{} with the Eiffel Tower in the background",
    "{} floating on top of water",
    "{} floating in an ocean of milk",
    "{} on top of green grass with sunflowers around it",
    "{} on top of a mirror",
    "{} on top of the sidewalk in a crowded street",
    "{} on top of a dirt road",
    "{} on top of a white rug",
    "{}, red",
    "{}, purple",
    "{}, shiny",
    "{}, wet",
    "{}, cube shaped",
)

KOSMOSG_LIVE_PROMPTS = (
    "{} in the jungle",
    "{} in the snow",
    "{} on the beach",
    "{} on a cobblestone street",
    "{} on top of pink fabric",
    "{} on top of a wooden floor",
    "{} with a city in the background",
    "{} with a mountain in the background",
    "{} with a blue house in the background",
    "{} on top of a purple rug in a forest",
    "{} wearing a red hat",
    "{} wearing a santa hat",
    "{} wearing a rainbow scarf",
    "{} wearing a black top hat and a monocle",
    "{} in a chef outfit",
    "{} in a firefighter outfit",
    "{} in a police outfit",
    "{} wearing pink glasses",
    "{} wearing a yellow shirt",
    "{} in a purple wizard outfit",
    "{}, red",
    "{}, purple",
    "{}, shiny",
    "{}, wet",
    "{}, cube shaped",
)


@dataclass(frozen=True)
class Case:
    """One (reference image, prompt) pair of the protocol."""

    subject: str
    reference: str  # URI of the reference image the generations are compared with
    prompt_index: int
    kosmos_prompt: str  # interleaved prompt with one "<image>" slot for the reference
    text_prompt: str  # the plain prompt CLIP-T scores against

    @property
    def key(self) -> str:
        name = self.reference.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        return f"{self.subject}+{name}+{self.prompt_index:02d}"


def subject_class(subject: str) -> tuple[str, bool]:
    try:
        return SUBJECTS[subject]
    except KeyError:
        raise ValueError(f"unknown DreamBench subject {subject!r}; known: {sorted(SUBJECTS)}") from None


def cases(subject: str, references: list[str], drop_class: bool = False) -> list[Case]:
    """Every (reference image, prompt) pair of one subject, in a fixed order."""
    noun, live = subject_class(subject)
    plain, kosmos = (LIVE_PROMPTS, KOSMOSG_LIVE_PROMPTS) if live else (OBJECT_PROMPTS, KOSMOSG_OBJECT_PROMPTS)
    slot = "<image>" if drop_class else f"{noun} <image>"
    return [Case(subject, reference, i, kosmos[i].format(slot), plain[i].format(noun))
            for reference in sorted(references) for i in range(len(plain))]
