"""Generated product reviews with a clear sentiment: the data of the built-in task `reviews.yaml`.

A seeded template generator, so the task needs no download and no data file: every review is
put together from the word lists below (written for sieve; no third-party text) by
`random.Random(seed)`, and the same arguments give the same records on every machine and
Python version. Each review is one or two short sentences whose sentiment is plain (no
sarcasm, no negated praise): a narrow task a small instruct model does well, which is what
task-specific pruning is for.
"""

from __future__ import annotations

import random

LABELS = ("negative", "positive")

# Things reviewed, each with parts a reviewer might comment on.
THINGS = {
    "movie": ("plot", "acting", "soundtrack", "ending", "dialogue", "cast"),
    "film": ("story", "camera work", "script", "pacing", "characters", "music"),
    "book": ("writing", "story", "characters", "ending", "first chapter", "style"),
    "restaurant": ("food", "service", "dessert", "menu", "staff", "atmosphere"),
    "hotel": ("room", "staff", "breakfast", "bed", "location", "pool"),
    "phone": ("battery", "screen", "camera", "speaker", "design", "software"),
    "laptop": ("keyboard", "screen", "battery", "trackpad", "speakers", "build quality"),
    "blender": ("motor", "lid", "blades", "design", "controls", "jar"),
    "game": ("graphics", "story", "controls", "levels", "music", "multiplayer"),
    "album": ("songs", "vocals", "lyrics", "production", "opening track", "melodies"),
}

ADJECTIVES = {
    "positive": ("excellent", "wonderful", "great", "fantastic", "delightful", "superb", "lovely",
                 "brilliant", "outstanding", "charming", "impressive", "amazing", "perfect", "terrific"),
    "negative": ("terrible", "awful", "horrible", "dreadful", "disappointing", "poor", "useless",
                 "boring", "unpleasant", "mediocre", "annoying", "painful", "lousy", "miserable"),
}
INTENSIFIERS = ("", "", "really ", "truly ", "absolutely ", "simply ")
# Whole-item verdicts (`{thing}` is filled in).
VERDICTS = {
    "positive": ("I loved this {thing}.", "This {thing} made my day.", "I would happily recommend this {thing}.",
                 "Best {thing} I have had in years.", "This {thing} exceeded my expectations.",
                 "I enjoyed every minute with this {thing}.", "Worth every penny.", "Five stars from me.",
                 "I would buy this {thing} again.", "A real pleasure from start to finish."),
    "negative": ("I hated this {thing}.", "This {thing} ruined my day.", "I would not recommend this {thing} to anyone.",
                 "Worst {thing} I have had in years.", "This {thing} was a waste of money.",
                 "I regretted every minute with this {thing}.", "Save your money.", "Avoid it at all costs.",
                 "I want my money back.", "A real chore from start to finish."),
}
OPENERS = ("", "", "", "Honestly, ", "Overall, ", "To be fair, ", "Well, ", "In short, ")


def _adjective(rng: random.Random, label: str) -> str:
    return rng.choice(INTENSIFIERS) + rng.choice(ADJECTIVES[label])


def _sentence(rng: random.Random, label: str, thing: str) -> str:
    """One sentence of the given sentiment about `thing` or one of its parts."""
    part = rng.choice(THINGS[thing])
    form = rng.randrange(5)
    if form == 0:
        return f"The {thing} was {_adjective(rng, label)}."
    if form == 1:
        return f"The {part} was {_adjective(rng, label)}."
    if form == 2:
        other = rng.choice([p for p in THINGS[thing] if p != part])
        return f"The {part} was {_adjective(rng, label)} and the {other} was {_adjective(rng, label)}."
    if form == 3:
        return _exclamation(rng, label, part)
    return rng.choice(VERDICTS[label]).format(thing=thing)


def _exclamation(rng: random.Random, label: str, part: str) -> str:
    adjective = _adjective(rng, label)
    return f"What {'an' if adjective[0] in 'aeiou' else 'a'} {adjective} {part}!"


def review_records(count: int = 1000, seed: int = 0) -> list[dict]:
    """`count` distinct reviews, half of each label in a seeded order: `id`, `text`, `label` (0 negative, 1 positive)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    labels = [i % 2 for i in range(count)]
    rng.shuffle(labels)
    for label in labels:
        while True:  # redraw until new: the split must not hold the same review twice
            text = review_text(rng, LABELS[label])
            if text not in seen:
                break
        seen.add(text)
        records.append({"id": f"review-{len(records):04d}", "text": text, "label": label})
    return records


def review_text(rng: random.Random, label: str) -> str:
    """One review: a sentence about the thing, and often a verdict after it."""
    thing = rng.choice(sorted(THINGS))
    first = _sentence(rng, label, thing)
    if rng.random() < 0.6:
        second = rng.choice(VERDICTS[label]).format(thing=thing)
        if second != first:
            first = f"{first} {second}"
    opener = rng.choice(OPENERS)
    if opener and not first.startswith("I "):
        first = first[0].lower() + first[1:]
    return opener + first
