"""Writes the JSONL data of the bundled lm-eval tasks; deterministic, so the shipped files can
be checked against it. Run ``python -m mixerzoo.evals.lm_tasks.make_data`` after changing it.

``choice.{validation,test}.jsonl`` (task ``mixerzoo_choice``): one question, four answers,
one right; six kinds that a small LM trained on English can start to get right::

    {"kind": "count", "query": "Count the words: pen pen pen pen pen pen. The count is",
     "choices": ["four", "three", "six", "eight"], "label": 2}
    {"kind": "order", "query": "Pick the sentence with its words in order:",
     "choices": ["happy school behind apple paints a the.", ...,
                 "a happy apple paints behind the school."], "label": 3}

(the others: ``arithmetic`` "Five plus three makes", ``sequence`` "April, May, June,",
``opposite`` "The opposite of slow is", ``fact`` "Birds fly in the").

``text.test.jsonl`` (task ``mixerzoo_perplexity``): short documents of simple English
sentences, ``{"text": "Anna carries the old box to the garden. ..."}``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_CHOICE = {"validation": 24, "test": 300}  # validation: the few-shot pool
N_DOCS = 200
N_OPTIONS = 4

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
           "ten", "eleven", "twelve"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
             ("old", "new"), ("open", "closed"), ("early", "late"), ("full", "empty"),
             ("happy", "sad"), ("left", "right"), ("wet", "dry"), ("light", "dark"), ("hard", "soft")]
FACTS = [("The colour of the clear sky is", "blue"), ("The colour of fresh grass is", "green"),
         ("The colour of snow is", "white"), ("A cow says", "moo"), ("A cat says", "meow"),
         ("A dog says", "woof"), ("The sun rises in the", "east"), ("Fish swim in the", "water"),
         ("Birds fly in the", "sky"), ("We read a", "book"), ("Ice is very", "cold"),
         ("A week has seven", "days"), ("Bees make", "honey"), ("We sleep in a", "bed")]
FACT_DISTRACTORS = ["blue", "green", "white", "moo", "meow", "woof", "east", "water", "sky",
                    "book", "cold", "days", "honey", "bed", "chair", "loud", "purple"]
NOUNS = ["dog", "cat", "bird", "child", "teacher", "farmer", "box", "ball", "cup", "book",
         "apple", "tree", "house", "river", "road", "garden", "window", "letter", "boat", "key"]
ADJS = ["red", "small", "big", "old", "new", "green", "quiet", "happy", "warm", "dark"]
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas"]
VERBS = ["carries", "finds", "sees", "paints", "cleans", "opens", "takes", "likes", "draws", "moves"]
PLACES = ["garden", "kitchen", "school", "market", "park", "river", "station", "library"]
PREPS = ["to", "near", "into", "behind", "from"]
WORDS = ["owl", "cup", "hat", "pen", "sun", "leaf", "coin", "star"]


def _options(rng: random.Random, right: str, pool: list[str]) -> tuple[list[str], int]:
    """``N_OPTIONS`` distinct answers, the right one at a random position."""
    wrong = rng.sample([w for w in dict.fromkeys(pool) if w != right], N_OPTIONS - 1)
    label = rng.randrange(N_OPTIONS)
    return wrong[:label] + [right] + wrong[label:], label


def _count(rng):
    n = rng.randint(1, 7)
    word = rng.choice(WORDS)
    return f"Count the words: {' '.join([word] * n)}. The count is", NUMBERS[n], NUMBERS[1:9]


def _arithmetic(rng):
    a, b = rng.randint(0, 6), rng.randint(0, 6)
    return f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} makes", NUMBERS[a + b], NUMBERS


def _sequence(rng):
    items = rng.choice([DAYS, MONTHS, NUMBERS[1:]])
    start = rng.randrange(len(items) - 3)
    return ", ".join(items[start:start + 3]) + ",", items[start + 3], items


def _opposite(rng):
    a, b = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        a, b = b, a
    return f"The opposite of {a} is", b, [w for pair in OPPOSITES for w in pair if a not in pair]


def _fact(rng):
    query, answer = rng.choice(FACTS)
    return query, answer, FACT_DISTRACTORS


def _sentence(rng) -> list[str]:
    return [rng.choice(["the", "a"]), rng.choice(ADJS), rng.choice(NOUNS), rng.choice(VERBS[:5]),
            rng.choice(PREPS), "the", rng.choice(PLACES)]


def _order(rng):
    words = _sentence(rng)
    shuffles = set()
    while len(shuffles) < N_OPTIONS - 1:
        s = rng.sample(words, len(words))
        if s != words:
            shuffles.add(" ".join(s) + ".")
    right = " ".join(words) + "."
    return "Pick the sentence with its words in order:", right, sorted(shuffles) + [right]


KINDS = {"count": _count, "arithmetic": _arithmetic, "sequence": _sequence,
         "opposite": _opposite, "fact": _fact, "order": _order}


def choice_examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = list(KINDS)[i % len(KINDS)]
        query, right, pool = KINDS[kind](rng)
        choices, label = _options(rng, right, pool)
        out.append({"id": i, "kind": kind, "query": query, "choices": choices, "label": label})
    return out


def documents(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            s = (f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(ADJS)} {rng.choice(NOUNS)} "
                 f"{rng.choice(PREPS)} the {rng.choice(PLACES)}.")
            if rng.random() < 0.3:
                s += f" It is {rng.choice(['a', 'the'])} {rng.choice(ADJS)} day in {rng.choice(MONTHS)}."
            sentences.append(s)
        docs.append({"id": i, "text": " ".join(sentences)})
    return docs


def files() -> dict[str, list[dict]]:
    """File name -> rows, exactly as shipped."""
    return {
        "choice.validation.jsonl": choice_examples(N_CHOICE["validation"], seed=1),
        "choice.test.jsonl": choice_examples(N_CHOICE["test"], seed=2),
        "text.test.jsonl": documents(N_DOCS, seed=3),
    }


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> None:
    for name, rows in files().items():
        (HERE / name).write_text(render(rows), encoding="utf-8")
        print(f"wrote {HERE / name} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
