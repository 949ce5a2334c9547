# Writes the small synthetic sample data the BERT recipes run on out of the box (deterministic; not from any dataset).
"""Regenerate with:  python recipes/data/make_samples.py

ner_train.conll / ner_dev.conll   sentences from templates and invented name lists, PER/ORG/LOC/MISC in IOB2 tags;
                                  about a fifth of every name list appears only in the dev split
cls_train.csv / cls_dev.csv       short product-review-like sentences, labels positive / negative
mlm_train.txt / mlm_dev.txt       plain text lines from the same generators, for masked-LM continued pretraining
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

FIRST = [
    "Maria",
    "John",
    "Aiko",
    "Lars",
    "Fatima",
    "Pedro",
    "Ingrid",
    "Omar",
    "Chen",
    "Olga",
    "Kwame",
    "Sofia",
    "Rahul",
    "Elena",
    "Tomas",
    "Amara",
    "Yusuf",
    "Hanna",
    "Diego",
    "Mei",
    "Nils",
    "Leila",
    "Pavel",
    "Grace",
]
LAST = [
    "Santos",
    "Miller",
    "Tanaka",
    "Berg",
    "Haddad",
    "Alvarez",
    "Lund",
    "Farouk",
    "Wei",
    "Ivanova",
    "Mensah",
    "Rossi",
    "Sharma",
    "Petrova",
    "Novak",
    "Okafor",
    "Demir",
    "Virtanen",
    "Morales",
    "Lin",
    "Holm",
    "Nasser",
]
ORG = [
    "Northwind Traders",
    "Bluepeak Labs",
    "Acme Corp",
    "Helios Energy",
    "Crescent Bank",
    "Orbital Systems",
    "Greenfield Farms",
    "Pioneer Motors",
    "Silverline Airways",
    "Quantum Dynamics",
    "Riverside Hospital",
    "Atlas Insurance",
    "Summit Media",
    "Ironclad Security",
    "Lumen Pharmaceuticals",
    "Harbor Logistics",
    "Cobalt Mining",
    "Vertex Software",
    "Maple Foods",
    "Aurora University",
]
LOC = [
    "Paris",
    "Nairobi",
    "Lisbon",
    "Osaka",
    "New York",
    "Buenos Aires",
    "Oslo",
    "Cairo",
    "Toronto",
    "Hamburg",
    "Mumbai",
    "Santiago",
    "Helsinki",
    "Lagos",
    "Melbourne",
    "Kraków",
    "Seoul",
    "Marseille",
    "Denver",
    "Porto",
]
MISC = [
    "French",
    "German",
    "Olympic",
    "Japanese",
    "Brazilian",
    "Nobel Prize",
    "World Cup",
    "Spanish",
    "Norwegian",
    "Kenyan",
    "Euro",
    "Arabic",
    "Italian",
    "Korean",
    "Oscar",
    "Finnish",
]

NER_TEMPLATES = [
    "{PER} works for {ORG} in {LOC} .",
    "{PER} visited {LOC} last week .",
    "{ORG} opened a new office in {LOC} .",
    "The {MISC} festival in {LOC} drew large crowds .",
    "{PER} and {PER} met at the {ORG} headquarters .",
    "According to {PER} , {ORG} will expand into {LOC} .",
    "{PER} speaks fluent {MISC} .",
    "Shares of {ORG} rose after the {MISC} announcement .",
    "She moved from {LOC} to {LOC} in 2019 .",
    "{ORG} hired {PER} as chief engineer .",
    "The {MISC} team beat {LOC} on Sunday .",
    "{PER} won the {MISC} for her work on batteries .",
    "Officials in {LOC} praised {ORG} for the new bridge .",
    "{PER} said the deal with {ORG} is almost done .",
    "Tourists from {LOC} love the {MISC} coast .",
    "A spokesperson for {ORG} declined to comment .",
    "{PER} flew to {LOC} to meet investors from {ORG} .",
    "Heavy rain closed schools in {LOC} on Monday .",
]

POSITIVE = [
    "great",
    "excellent",
    "wonderful",
    "fantastic",
    "reliable",
    "comfortable",
    "delightful",
    "superb",
    "impressive",
    "lovely",
    "sturdy",
    "fast",
]
NEGATIVE = [
    "terrible",
    "awful",
    "disappointing",
    "broken",
    "flimsy",
    "useless",
    "noisy",
    "horrible",
    "slow",
    "uncomfortable",
    "cheap",
    "faulty",
]
THINGS = [
    "phone",
    "laptop",
    "chair",
    "coffee maker",
    "jacket",
    "hotel room",
    "headset",
    "bicycle",
    "camera",
    "kettle",
    "backpack",
    "keyboard",
    "tent",
    "blender",
    "lamp",
    "printer",
]
CLS_TEMPLATES = [
    "The {thing} is {adj} .",
    "This {thing} turned out to be {adj} .",
    "Honestly , a really {adj} {thing} .",
    "My new {thing} feels {adj} after a month .",
    "I found the {thing} {adj} and the service {adj2} .",
    "What a {adj} {thing} , I told all my friends .",
    "The {thing} arrived on time and it is {adj} .",
    "Overall the {thing} was {adj} for the price .",
]


def split_pool(pool: list[str], rng: random.Random) -> tuple[list[str], list[str]]:
    """(train names, dev names): dev draws from every name, train never sees the last fifth."""
    shuffled = pool[:]
    rng.shuffle(shuffled)
    return shuffled[: len(shuffled) * 4 // 5], shuffled


def entity_sentence(template: str, pools: dict[str, list[str]], rng: random.Random) -> list[tuple[str, str]]:
    tagged = []
    for token in template.split():
        if token.startswith("{") and token.endswith("}"):
            kind = token[1:-1]
            name = (
                f"{rng.choice(pools['FIRST'])} {rng.choice(pools['LAST'])}"
                if kind == "PER"
                else rng.choice(pools[kind])
            )
            tagged += [(word, ("B-" if i == 0 else "I-") + kind) for i, word in enumerate(name.split())]
        else:
            tagged.append((token, "O"))
    return tagged


def write_ner(path: Path, count: int, pools: dict[str, list[str]], rng: random.Random) -> list[str]:
    lines, texts = ["-DOCSTART- O", ""], []
    for _ in range(count):
        tagged = entity_sentence(rng.choice(NER_TEMPLATES), pools, rng)
        lines += [f"{word} {tag}" for word, tag in tagged] + [""]
        texts.append(" ".join(word for word, _ in tagged))
    path.write_text("\n".join(lines), encoding="utf-8")
    return texts


def review(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    words = POSITIVE if label == "positive" else NEGATIVE
    text = rng.choice(CLS_TEMPLATES).format(thing=rng.choice(THINGS), adj=rng.choice(words), adj2=rng.choice(words))
    return text, label


def write_cls(path: Path, count: int, rng: random.Random) -> list[str]:
    rows = [review(rng) for _ in range(count)]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return [text for text, _ in rows]


def main() -> None:
    rng = random.Random(20240611)
    split = {
        kind: split_pool(pool, rng)
        for kind, pool in {"FIRST": FIRST, "LAST": LAST, "ORG": ORG, "LOC": LOC, "MISC": MISC}.items()
    }
    train_pools = {kind: pair[0] for kind, pair in split.items()}
    dev_pools = {kind: pair[1] for kind, pair in split.items()}
    ner_train = write_ner(HERE / "ner_train.conll", 400, train_pools, rng)
    ner_dev = write_ner(HERE / "ner_dev.conll", 100, dev_pools, rng)
    cls_train = write_cls(HERE / "cls_train.csv", 320, rng)
    cls_dev = write_cls(HERE / "cls_dev.csv", 80, rng)
    (HERE / "mlm_train.txt").write_text("\n".join(ner_train[:200] + cls_train[:200]) + "\n", encoding="utf-8")
    (HERE / "mlm_dev.txt").write_text("\n".join(ner_dev[:40] + cls_dev[:40]) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
