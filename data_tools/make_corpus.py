"""Regenerate the bundled corpus (`nemotron_train/data/corpus/corpus.txt.gz`) and its BPE (`tokenizer.json`).

    python -m data_tools.make_corpus [--stories 16000] [--seed 0]

The corpus is synthetic English written by this generator (CC0, see nemotron_train/data/corpus/README.md):
short stories with recurring characters, places and objects, told with a small grammar,
plus counting, calendar and arithmetic passages. It has the structure a tiny model can
learn within a minute (a few hundred frequent words, agreement between names and
pronouns, stories that keep their characters), unlike uniform random words. The output is
deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import gzip
import random
import sys
from pathlib import Path
from typing import List

from nemotron_train.data.bundled import CORPUS_DIR, CORPUS_FILE, TOKENIZER_FILE, read_corpus
from nemotron_train.errors import UserError

__all__ = ["CORPUS_DIR", "CORPUS_FILE", "TOKENIZER_FILE", "generate", "main", "read_corpus", "write_corpus"]

GIRLS = ["Anna", "Clara", "Emma", "Grace", "Ivy", "Lily", "Nora", "Rosa", "Tara", "Vera", "Mia", "Zoe", "Lucy", "Ella"]
BOYS = ["Ben", "David", "Finn", "Henry", "Jack", "Max", "Oscar", "Paul", "Sam", "Leo", "Tom", "Noah", "Omar", "Hugo"]
ANIMALS = ["dog", "cat", "bird", "rabbit", "fox", "horse", "duck", "mouse", "bear", "owl", "frog", "goat", "turtle", "squirrel"]
ANIMAL_NAMES = ["Spot", "Whiskers", "Pip", "Coco", "Rusty", "Bella", "Toby", "Daisy", "Milo", "Luna"]
PLACES = ["the park", "the forest", "the river", "the garden", "the beach", "the market", "the school", "the farm",
          "the hill", "the lake", "the village", "the library", "the meadow", "the old bridge", "the bakery"]
OBJECTS = ["ball", "boat", "kite", "book", "hat", "box", "key", "apple", "blanket", "drum", "map", "lamp", "shell",
           "cup", "bell", "flower", "basket", "scarf"]
COLORS = ["red", "blue", "green", "yellow", "white", "brown", "orange", "purple", "little", "shiny", "old", "new"]
FEELINGS = ["happy", "sad", "scared", "tired", "excited", "angry", "surprised", "proud", "worried", "calm"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy", "quiet", "bright"]
TIMES = ["One morning", "One day", "After lunch", "In the evening", "Early one morning", "Last summer",
         "On a " + "{weather}" + " day", "Before school", "One night", "On Saturday"]
FOODS = ["bread", "soup", "cake", "apples", "cheese", "rice", "berries", "cookies", "carrots", "honey"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class Story:
    """One story's cast: fixed for the whole story, so pronouns and names agree."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        girl = rng.random() < 0.5
        self.name = rng.choice(GIRLS if girl else BOYS)
        self.he, self.his, self.him = ("she", "her", "her") if girl else ("he", "his", "him")
        friend_girl = rng.random() < 0.5
        self.friend = rng.choice([n for n in (GIRLS if friend_girl else BOYS) if n != self.name])
        self.fhe = "she" if friend_girl else "he"
        self.animal = rng.choice(ANIMALS)
        self.pet = rng.choice(ANIMAL_NAMES)
        self.place = rng.choice(PLACES)
        self.obj = rng.choice(OBJECTS)
        self.color = rng.choice(COLORS)
        self.feeling = rng.choice(FEELINGS)
        self.weather = rng.choice(WEATHER)
        self.food = rng.choice(FOODS)

    def fill(self, template: str) -> str:
        s = template.format(
            name=self.name, he=self.he, his=self.his, him=self.him, friend=self.friend, fhe=self.fhe,
            animal=self.animal, pet=self.pet, place=self.place, obj=self.obj, color=self.color,
            feeling=self.feeling, weather=self.weather, food=self.food, a_color=_an(self.color),
            a_animal=_an(self.animal), time=self.rng.choice(TIMES).format(weather=self.weather),
        )
        return s[0].upper() + s[1:]


INTRO = [
    "{time}, {name} went to {place}.",
    "{time}, {name} and {his} friend {friend} walked to {place}.",
    "There was once a child named {name} who lived near {place}.",
    "{name} had {a_color} {obj} that {he} loved very much.",
    "{name} had {a_animal} called {pet}.",
    "It was a {weather} day, and {name} wanted to play at {place}.",
]
MIDDLE = [
    "{he} took {his} {color} {obj} with {him}.",
    "At {place}, {he} saw {a_animal} sitting under a tree.",
    "{pet} the {animal} ran ahead and barked at the wind.",
    "{friend} said, \"Let us look for something fun to do.\"",
    "They played with the {obj} for a long time.",
    "The sky was {weather}, and the air smelled of {food}.",
    "{name} shared {his} {food} with {friend}.",
    "{he} counted the birds in the sky and found seven.",
    "{name} felt {feeling} and looked around.",
    "The {animal} came closer and looked at the {obj}.",
]
PROBLEM = [
    "Then the wind blew the {obj} away, and {name} began to cry.",
    "Suddenly, {name} could not find {his} {obj}.",
    "But the {animal} took the {obj} and ran into the bushes.",
    "Then it started to rain, and {name} was far from home.",
    "{friend} fell down and hurt a knee, and {fhe} could not walk fast.",
    "The path was long, and {name} was very tired.",
    "{name} wanted the last piece of {food}, but so did {friend}.",
]
SOLUTION = [
    "{friend} helped {him} look, and they found the {obj} behind a rock.",
    "{name} asked for help, and a kind woman showed {him} the way home.",
    "The {animal} brought the {obj} back and wagged its tail.",
    "They waited under a tree until the rain stopped.",
    "{name} gave half of the {food} to {friend}, and they both smiled.",
    "{name} took a deep breath and tried again.",
    "{friend} held {his} hand, and they walked home together.",
]
ENDING = [
    "In the end, {name} was {feeling} and went home.",
    "That night, {name} slept well and dreamed about {place}.",
    "{name} learned that sharing makes friends happy.",
    "{name} learned to be brave, even when things go wrong.",
    "From that day on, {name} and {friend} were best friends.",
    "{name} put the {obj} in a safe place and smiled.",
    "The end.",
]


def _story(rng: random.Random) -> str:
    st = Story(rng)
    parts = [st.fill(rng.choice(INTRO))]
    parts += [st.fill(t) for t in rng.sample(MIDDLE, rng.randint(1, 3))]
    parts.append(st.fill(rng.choice(PROBLEM)))
    parts.append(st.fill(rng.choice(SOLUTION)))
    parts.append(st.fill(rng.choice(ENDING)))
    return " ".join(parts)


def _counting(rng: random.Random) -> str:
    start = rng.randint(0, 10)
    n = rng.randint(4, 8)
    seq = ", ".join(NUMBERS[start : start + n])
    obj = rng.choice(OBJECTS)
    k = rng.randint(2, 9)
    girl = rng.random() < 0.5
    name, he = (rng.choice(GIRLS), "she") if girl else (rng.choice(BOYS), "he")
    return (
        f"Let us count: {seq}. After {NUMBERS[start + n - 1]} comes {NUMBERS[start + n]}. "
        f"{name} has {NUMBERS[k]} {_plural(obj)}. If {he} gets one more, "
        f"there are {NUMBERS[k + 1]} {_plural(obj)}."
    )


def _calendar(rng: random.Random) -> str:
    d = rng.randrange(7)
    m = rng.randrange(12)
    return (
        f"Today is {DAYS[d]}. Tomorrow is {DAYS[(d + 1) % 7]}, and yesterday was {DAYS[(d - 1) % 7]}. "
        f"The month is {MONTHS[m]}. The next month is {MONTHS[(m + 1) % 12]}. A week has seven days."
    )


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(2, 4)):
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        if rng.random() < 0.5:
            lines.append(f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
        else:
            hi, lo = max(a, b), min(a, b)
            lines.append(f"{NUMBERS[hi].capitalize()} minus {NUMBERS[lo]} is {NUMBERS[hi - lo]}.")
    return " ".join(lines)


def generate(stories: int, seed: int) -> List[str]:
    rng = random.Random(seed)
    docs: List[str] = []
    for _ in range(stories):
        r = rng.random()
        if r < 0.80:
            docs.append(_story(rng))
        elif r < 0.87:
            docs.append(_counting(rng))
        elif r < 0.93:
            docs.append(_calendar(rng))
        else:
            docs.append(_arithmetic(rng))
    return docs


def write_corpus(docs: List[str], path: Path = CORPUS_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same documents always give the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(("\n\n".join(docs) + "\n").encode("utf-8"))


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.make_corpus", description=__doc__.splitlines()[0])
    p.add_argument("--stories", type=int, default=16000, help="documents to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size (at most 512 for the smoke model)")
    args = p.parse_args(argv)
    from data_tools.train_bpe import train_bpe

    docs = generate(args.stories, args.seed)
    try:
        write_corpus(docs)
        train_bpe(docs, TOKENIZER_FILE, vocab_size=args.vocab_size)
    except UserError as exc:
        print(f"make_corpus: error: {exc}", file=sys.stderr)
        return 2
    size = sum(len(d) for d in docs)
    print(f"{CORPUS_FILE}: {len(docs)} documents, {size / 1e6:.2f} MB of text; {TOKENIZER_FILE}: vocab {args.vocab_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
