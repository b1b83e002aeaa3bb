"""A small generated English corpus, so that language modelling runs anywhere with no download.

Documents are short descriptions of made-up animals, counting and sums, built from a fixed
grammar with a seeded generator: regular enough for a ``tiny`` model to learn in a minute on
a CPU (``mixerzoo demo --lm``), varied enough that the validation loss means something.

>>> docs = make_documents(2, seed=0)   # doctest: +SKIP
>>> print(docs[0])                      # doctest: +SKIP
The red fox lives in the forest. The red fox eats berries. ...
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

COLOURS = ["red", "blue", "green", "brown", "grey", "white", "black", "yellow"]
ANIMALS = ["fox", "cat", "dog", "owl", "bear", "frog", "duck", "goat", "horse", "mouse"]
PLACES = ["forest", "river", "garden", "hill", "field", "lake", "barn", "cave"]
FOODS = ["berries", "fish", "seeds", "grass", "apples", "bread", "corn", "nuts"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def _animal_story(rng: random.Random) -> str:
    colour, animal = rng.choice(COLOURS), rng.choice(ANIMALS)
    place, food = rng.choice(PLACES), rng.choice(FOODS)
    name = f"the {colour} {animal}"
    friend = f"the {rng.choice(COLOURS)} {rng.choice(ANIMALS)}"
    sentences = [
        f"{name.capitalize()} lives in the {place}.",
        f"{name.capitalize()} eats {food}.",
        f"Every morning {name} walks to the {rng.choice(PLACES)} with {friend}.",
        f"When it rains, {name} stays in the {place}.",
        f"{friend.capitalize()} does not eat {food}, but {name} does.",
        f"Where does {name} live? {name.capitalize()} lives in the {place}.",
    ]
    middle = sentences[1:5]
    rng.shuffle(middle)
    sentences[1:5] = middle
    return " ".join(sentences)


def _counting(rng: random.Random) -> str:
    start = rng.randrange(0, 8)
    run = " ".join(NUMBERS[start:start + rng.randrange(4, 10)])
    a, b = rng.randrange(0, 10), rng.randrange(0, 9)
    return (f"Counting from {NUMBERS[start]}: {run}. "
            f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}. "
            f"{NUMBERS[a + b].capitalize()} minus {NUMBERS[b]} is {NUMBERS[a]}.")


def make_documents(n_docs: int, seed: int = 0) -> list[str]:
    """``n_docs`` generated documents (deterministic given ``seed``)."""
    if n_docs < 1:
        raise ValueError(f"n_docs must be >= 1, got {n_docs}")
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = [_animal_story(rng) if rng.random() < 0.7 else _counting(rng) for _ in range(rng.randrange(1, 4))]
        docs.append("\n".join(parts))
    return docs


def write_corpus(path: str | Path, n_docs: int = 3000, seed: int = 0) -> Path:
    """Write the generated documents as JSONL (field ``text``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for doc in make_documents(n_docs, seed):
            f.write(json.dumps({"text": doc}) + "\n")
    os.replace(tmp, path)
    return path
