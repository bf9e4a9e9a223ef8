"""Write ``selection_bench.jsonl``: the selection benchmark's questions, answers and split.

Six families, each asked in a few phrasings (some with a format instruction, some without, as
users ask): ``arithmetic``, ``number_facts`` (counts and unit conversions) and ``sequences``
(numbers), ``capitals`` and ``word_facts`` (short text answers), ``multiple_choice`` (a letter).
Every third item of each family is in the ``dev`` split (tune on it), the others in ``test``.
No numeric answer equals a number of its question. Deterministic: rerunning writes the same file.

    .venv/bin/python -m benchmarks.data.make_selection_bench
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "selection_bench.jsonl"

CAPITALS: list[tuple[str, list[str]]] = [
    ("France", ["Paris"]),
    ("Japan", ["Tokyo"]),
    ("Italy", ["Rome"]),
    ("Germany", ["Berlin"]),
    ("Spain", ["Madrid"]),
    ("the United Kingdom", ["London"]),
    ("Russia", ["Moscow"]),
    ("China", ["Beijing", "Peking"]),
    ("Egypt", ["Cairo"]),
    ("Greece", ["Athens"]),
    ("Portugal", ["Lisbon"]),
    ("Ireland", ["Dublin"]),
    ("Norway", ["Oslo"]),
    ("Sweden", ["Stockholm"]),
    ("Finland", ["Helsinki"]),
    ("Denmark", ["Copenhagen"]),
    ("Poland", ["Warsaw"]),
    ("Austria", ["Vienna"]),
    ("Hungary", ["Budapest"]),
    ("the Czech Republic", ["Prague"]),
    ("the Netherlands", ["Amsterdam"]),
    ("Belgium", ["Brussels"]),
    ("Switzerland", ["Bern", "Berne"]),
    ("Canada", ["Ottawa"]),
    ("Mexico", ["Mexico City"]),
    ("Argentina", ["Buenos Aires"]),
    ("Peru", ["Lima"]),
    ("Chile", ["Santiago"]),
    ("Colombia", ["Bogota", "Bogotá"]),
    ("Venezuela", ["Caracas"]),
    ("Cuba", ["Havana"]),
    ("India", ["New Delhi"]),
    ("Thailand", ["Bangkok"]),
    ("Vietnam", ["Hanoi"]),
    ("South Korea", ["Seoul"]),
    ("Indonesia", ["Jakarta"]),
    ("the Philippines", ["Manila"]),
    ("Kenya", ["Nairobi"]),
    ("Ethiopia", ["Addis Ababa"]),
    ("Turkey", ["Ankara"]),
    ("Iran", ["Tehran", "Teheran"]),
    ("Iraq", ["Baghdad"]),
    ("Saudi Arabia", ["Riyadh"]),
    ("Lebanon", ["Beirut"]),
    ("Syria", ["Damascus"]),
    ("Afghanistan", ["Kabul"]),
    ("Pakistan", ["Islamabad"]),
    ("Bangladesh", ["Dhaka"]),
    ("Nepal", ["Kathmandu"]),
    ("Australia", ["Canberra"]),
    ("New Zealand", ["Wellington"]),
    ("Iceland", ["Reykjavik", "Reykjavík"]),
    ("Ukraine", ["Kyiv", "Kiev"]),
    ("Romania", ["Bucharest"]),
    ("Bulgaria", ["Sofia"]),
    ("Serbia", ["Belgrade"]),
    ("Croatia", ["Zagreb"]),
    ("Morocco", ["Rabat"]),
    ("Nigeria", ["Abuja"]),
    ("Ghana", ["Accra"]),
    ("Senegal", ["Dakar"]),
    ("Jamaica", ["Kingston"]),
    ("Malaysia", ["Kuala Lumpur"]),
    ("Brazil", ["Brasilia", "Brasília"]),
]

WORD_FACTS: list[tuple[str, list[str]]] = [
    ("What color is a banana?", ["yellow"]),
    ("What color is grass?", ["green"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What color is snow?", ["white"]),
    ("What color is coal?", ["black"]),
    ("What color is a ripe tomato?", ["red"]),
    ("What color is a carrot?", ["orange"]),
    ("What color is milk chocolate?", ["brown"]),
    ("What color is a lemon?", ["yellow"]),
    ("What color is fresh milk?", ["white"]),
    ("Which animal says 'moo'?", ["cow", "cows", "cattle"]),
    ("Which animal says 'woof'?", ["dog", "dogs"]),
    ("Which animal says 'meow'?", ["cat", "cats", "kitten"]),
    ("Which animal says 'oink'?", ["pig", "pigs"]),
    ("Which animal says 'baa'?", ["sheep", "lamb"]),
    ("Which animal says 'quack'?", ["duck", "ducks"]),
    ("Which animal says 'neigh'?", ["horse", "horses"]),
    ("Which bird says 'hoot'?", ["owl", "owls"]),
    ("What is the opposite of 'hot'?", ["cold"]),
    ("What is the opposite of 'big'?", ["small", "little", "tiny"]),
    ("What is the opposite of 'up'?", ["down"]),
    ("What is the opposite of 'fast'?", ["slow"]),
    ("What is the opposite of 'happy'?", ["sad", "unhappy"]),
    ("What is the opposite of 'day'?", ["night"]),
    ("What is the opposite of 'open'?", ["closed", "close", "shut"]),
    ("What is the opposite of 'wet'?", ["dry"]),
    ("What is the opposite of 'tall'?", ["short"]),
    ("What is the opposite of 'early'?", ["late"]),
    ("What is the opposite of 'full'?", ["empty"]),
    ("What is the opposite of 'good'?", ["bad", "evil"]),
    ("What is the opposite of 'rich'?", ["poor"]),
    ("What is the opposite of 'left'?", ["right"]),
    ("What is the opposite of 'strong'?", ["weak"]),
    ("What is the opposite of 'loud'?", ["quiet", "soft", "silent"]),
    ("What is the opposite of 'win'?", ["lose", "loss"]),
    ("What is the opposite of 'young'?", ["old"]),
    ("What is a baby cat called?", ["kitten", "kitty"]),
    ("What is a baby dog called?", ["puppy", "pup"]),
    ("What is a baby cow called?", ["calf"]),
    ("What is a baby sheep called?", ["lamb"]),
    ("What is a baby horse called?", ["foal", "colt", "filly"]),
    ("What is a baby frog called?", ["tadpole", "polliwog"]),
    ("What is a baby duck called?", ["duckling"]),
    ("What is a baby kangaroo called?", ["joey"]),
    ("What is a baby bear called?", ["cub"]),
    ("What is a baby goat called?", ["kid"]),
    ("What is the largest planet in the solar system?", ["Jupiter"]),
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("What is the largest ocean on Earth?", ["Pacific", "Pacific Ocean"]),
    ("Who wrote 'Romeo and Juliet'?", ["Shakespeare", "William Shakespeare"]),
    ("What is frozen water called?", ["ice"]),
    ("What do bees make?", ["honey"]),
    ("What is the tallest animal in the world?", ["giraffe", "giraffes"]),
    ("What is the largest mammal in the world?", ["blue whale", "whale"]),
    ("What is the hardest natural substance?", ["diamond", "diamonds"]),
    ("Which star is at the center of our solar system?", ["the Sun", "Sun"]),
    ("What is the chemical symbol for gold?", ["Au"]),
    ("What is the chemical symbol for water?", ["H2O"]),
    ("Which gas do humans need to breathe to live?", ["oxygen", "O2"]),
    ("What is the main language spoken in Brazil?", ["Portuguese"]),
    ("What is the main language spoken in Mexico?", ["Spanish"]),
    ("In which country are the pyramids of Giza?", ["Egypt"]),
    ("Which continent is Kenya in?", ["Africa"]),
    ("Which continent is France in?", ["Europe"]),
    ("What is the currency of Japan?", ["yen", "Japanese yen"]),
    ("What is the currency of the United Kingdom?", ["pound", "pound sterling", "pounds", "GBP"]),
    ("Which organ pumps blood through the body?", ["heart"]),
    ("Which organ do humans use to breathe?", ["lungs", "lung"]),
    ("What is the first letter of the English alphabet?", ["A"]),
    ("Which season comes after winter?", ["spring"]),
    ("Which day comes after Monday?", ["Tuesday"]),
    ("Which month comes after June?", ["July"]),
]

NUMBER_FACTS: list[tuple[str, str]] = [
    ("How many legs does a spider have?", "8"),
    ("How many legs does an insect have?", "6"),
    ("How many legs does a dog have?", "4"),
    ("How many legs does a bird have?", "2"),
    ("How many days are in a week?", "7"),
    ("How many days are in a year that is not a leap year?", "365"),
    ("How many days are in a leap year?", "366"),
    ("How many hours are in a day?", "24"),
    ("How many minutes are in an hour?", "60"),
    ("How many seconds are in a minute?", "60"),
    ("How many months are in a year?", "12"),
    ("How many weeks are in a year?", "52"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a hexagon have?", "6"),
    ("How many sides does an octagon have?", "8"),
    ("How many sides does a pentagon have?", "5"),
    ("How many sides does a square have?", "4"),
    ("How many continents are there on Earth?", "7"),
    ("How many planets are in our solar system?", "8"),
    ("How many players does a soccer team have on the field?", "11"),
    ("How many strings does a standard guitar have?", "6"),
    ("How many cents are in a dollar?", "100"),
    ("How many centimeters are in a meter?", "100"),
    ("How many millimeters are in a centimeter?", "10"),
    ("How many grams are in a kilogram?", "1000"),
    ("How many meters are in a kilometer?", "1000"),
    ("How many inches are in a foot?", "12"),
    ("How many feet are in a yard?", "3"),
    ("How many ounces are in a pound?", "16"),
    ("How many years are in a century?", "100"),
    ("How many years are in a decade?", "10"),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100"),
    ("At what temperature in degrees Fahrenheit does water freeze?", "32"),
    ("How many wheels does a bicycle have?", "2"),
    ("How many wheels does a tricycle have?", "3"),
    ("How many keys does a standard piano have?", "88"),
    ("How many days are in February in a year that is not a leap year?", "28"),
    ("How many days are in April?", "30"),
    ("How many bones are in the adult human body?", "206"),
    ("How many letters are in the English alphabet?", "26"),
    ("How many degrees are in a right angle?", "90"),
    ("How many degrees are in a full circle?", "360"),
    ("How many states are in the United States?", "50"),
    ("How many eggs are in a dozen?", "12"),
    ("How many centimeters are in 3 meters?", "300"),
    ("How many minutes are in 3 hours?", "180"),
    ("How many days are in 2 weeks?", "14"),
    ("How many months are in 2 years?", "24"),
    ("How many grams are in 2 kilograms?", "2000"),
    ("How many seconds are in 2 minutes?", "120"),
    ("How many hours are in 2 days?", "48"),
    ("How many inches are in 2 feet?", "24"),
    ("How many feet are in 2 yards?", "6"),
    ("How many millimeters are in 5 centimeters?", "50"),
    ("How many meters are in 3 kilometers?", "3000"),
    ("How many years are in 3 decades?", "30"),
    ("How many cents are in 3 dollars?", "300"),
    ("How many eggs are in 2 dozen?", "24"),
    ("How many minutes are in half an hour?", "30"),
    ("How many hours are in a week?", "168"),
]

CATEGORIES: dict[str, list[str]] = {
    "fruit": ["apple", "banana", "orange", "grape", "mango", "pear", "cherry", "peach"],
    "animal": ["dog", "cat", "horse", "lion", "tiger", "rabbit", "elephant", "mouse"],
    "vehicle": ["car", "bus", "bicycle", "train", "truck", "airplane", "boat"],
    "tool": ["hammer", "screwdriver", "saw", "wrench", "drill", "shovel"],
    "piece of clothing": ["shirt", "jacket", "sock", "hat", "scarf", "glove"],
    "piece of furniture": ["chair", "table", "sofa", "bed", "desk", "shelf"],
    "color": ["red", "blue", "green", "yellow", "purple"],
    "musical instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet"],
    "planet": ["Mars", "Venus", "Jupiter", "Saturn", "Mercury", "Neptune"],
}

LETTERS = "ABCD"

NUMBER_SUFFIXES = ("", "\nAnswer with just the number.", "\nGive the answer as a number.")
SHORT_SUFFIXES = ("", "\nAnswer in one or two words.", "\nAnswer briefly.")
CHOICE_SUFFIXES = (
    "\nAnswer with the letter of the correct option.",
    "\nReply with A, B, C or D.",
    "",
)


def _arithmetic(rng: random.Random, count: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    ops = [("+", "plus"), ("-", "minus"), ("times", "times")]
    while len(items) < count:
        op, word = ops[len(items) % 3]
        if op == "+":
            a, b = rng.randint(11, 60), rng.randint(11, 40)
            value = a + b
        elif op == "-":
            a = rng.randint(30, 90)
            b = rng.randint(11, a - 11)
            value = a - b
        else:
            a, b = rng.randint(3, 12), rng.randint(3, 12)
            value = a * b
        if str(value) in {str(a), str(b)} or value in (a, b):
            continue
        shown = op if op != "times" else rng.choice(["times", "x", "*"])
        style = len(items) % 3
        if style == 0:
            question = f"What is {a} {shown} {b}?"
        elif style == 1:
            question = f"Calculate {a} {word} {b}."
        else:
            question = f"What is {a} {shown} {b}?"
        if question in seen:
            continue
        seen.add(question)
        suffix = NUMBER_SUFFIXES[(len(items) // 3) % 3]
        items.append({"question": question + suffix, "answer": str(value)})
    return items


def _sequences(rng: random.Random, count: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(items) < count:
        kind = len(items) % 4
        if kind == 3:
            start, ratio = rng.choice([(1, 2), (2, 2), (3, 2), (5, 2), (1, 3), (2, 3), (1, 10)])
            terms = [start * ratio**i for i in range(5)]
        elif kind == 2:
            start, step = rng.randint(40, 90), rng.randint(2, 9)
            terms = [start - step * i for i in range(5)]
        else:
            start, step = rng.randint(1, 20), rng.randint(2, 9)
            terms = [start + step * i for i in range(5)]
        shown, answer = terms[:4], terms[4]
        listed = ", ".join(str(t) for t in shown)
        style = len(items) % 3
        if style == 0:
            question = f"What is the next number in the sequence {listed}?"
        elif style == 1:
            question = f"What number comes next: {listed}, ...?"
        else:
            question = f"Continue the sequence with one number: {listed}"
        if question in seen or answer < 0:
            continue
        seen.add(question)
        suffix = NUMBER_SUFFIXES[(len(items) // 3) % 3] if style != 2 else ""
        items.append({"question": question + suffix, "answer": str(answer)})
    return items


def _number_facts() -> list[dict[str, Any]]:
    return [
        {"question": q + NUMBER_SUFFIXES[i % 3], "answer": a}
        for i, (q, a) in enumerate(NUMBER_FACTS)
    ]


def _capitals() -> list[dict[str, Any]]:
    items = []
    for i, (country, names) in enumerate(CAPITALS):
        style = i % 3
        if style == 0:
            question = f"What is the capital of {country}?"
        elif style == 1:
            question = f"What is the capital city of {country}?"
        else:
            question = f"Name the capital of {country}."
        items.append({"question": question + SHORT_SUFFIXES[(i // 3) % 3], "answer": names})
    return items


def _word_facts() -> list[dict[str, Any]]:
    return [
        {"question": q + SHORT_SUFFIXES[i % 3], "answer": a} for i, (q, a) in enumerate(WORD_FACTS)
    ]


def _choice(
    question: str, right: str, wrong: list[str], position: int, suffix: str
) -> dict[str, Any]:
    options = list(wrong)
    options.insert(position, right)
    listed = "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(options))
    return {
        "question": f"{question}\n{listed}{suffix}",
        "answer": LETTERS[position],
        "options": options,
    }


def _multiple_choice(rng: random.Random) -> list[dict[str, Any]]:
    items = []
    names = list(CATEGORIES)
    for i in range(44):
        category = names[i % len(names)]
        right = rng.choice(CATEGORIES[category])
        others = rng.sample([n for n in names if n != category], 3)
        wrong = [rng.choice(CATEGORIES[o]) for o in others]
        article = "an" if category[0] in "aeiou" else "a"
        items.append(
            _choice(
                f"Which of these is {article} {category}?",
                right,
                wrong,
                i % 4,
                CHOICE_SUFFIXES[(i // 4) % 3],
            )
        )
    capitals = rng.sample(CAPITALS, 30)
    for i, (country, names_) in enumerate(capitals):
        pool = [c[1][0] for c in CAPITALS if c[0] != country]
        wrong = rng.sample(pool, 3)
        items.append(
            _choice(
                f"What is the capital of {country}?",
                names_[0],
                wrong,
                (i + 1) % 4,
                CHOICE_SUFFIXES[(i // 4 + 1) % 3],
            )
        )
    return items


def build() -> list[dict[str, Any]]:
    rng = random.Random(16)
    families = {
        "arithmetic": _arithmetic(rng, 60),
        "number_facts": _number_facts(),
        "sequences": _sequences(rng, 60),
        "capitals": _capitals(),
        "word_facts": _word_facts(),
        "multiple_choice": _multiple_choice(rng),
    }
    out = []
    for family, items in families.items():
        for i, item in enumerate(items):
            answer = item["answer"]
            answers = answer if isinstance(answer, list) else [answer]
            row = {
                "id": f"{family}-{i + 1:03d}",
                "family": family,
                "split": "dev" if i % 3 == 0 else "test",
                "question": item["question"],
                "answers": answers,
            }
            if "options" in item:
                row["options"] = item["options"]
            out.append(row)
    return out


def main() -> None:
    rows = build()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    by_family: dict[str, int] = {}
    for r in rows:
        by_family[r["family"]] = by_family.get(r["family"], 0) + 1
    dev = sum(r["split"] == "dev" for r in rows)
    print(f"wrote {len(rows)} items ({dev} dev, {len(rows) - dev} test) to {OUT.name}: {by_family}")


if __name__ == "__main__":
    main()
