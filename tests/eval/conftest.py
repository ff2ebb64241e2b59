"""Fixtures of tests/eval: prediction / ground-truth files in the formats the benchmarks ship."""

import json
import random

import pytest

WORDS = ("a man woman dog cat red blue small large riding sitting on in the of with near next to street table "
         "field bike horse two three people standing grass water car white black young old playing ball").split()


def _sentence(rng: random.Random, base: list[str]) -> str:
    """A caption near ``base``: words swapped and dropped, capitals and punctuation as people type them."""
    words = [w if rng.random() > 0.3 else rng.choice(WORDS) for w in base if rng.random() > 0.1]
    text = " ".join(words or base)
    text = text[0].upper() + text[1:] if rng.random() < 0.5 else text
    return text + rng.choice(["", ".", " .", "!", ", too."])


@pytest.fixture(scope="session")
def caption_fixture():
    """``(predictions, references)``: 120 images, 5 references each, one prediction each (seeded)."""
    rng = random.Random(0)
    images, annotations, predictions = [], [], []
    for image_id in range(1000, 1120):
        base = [rng.choice(WORDS) for _ in range(rng.randint(5, 11))]
        images.append({"id": image_id, "file_name": f"{image_id}.jpg"})
        for _ in range(5):
            annotations.append({"image_id": image_id, "id": len(annotations), "caption": _sentence(rng, base)})
        predictions.append({"image_id": image_id, "caption": _sentence(rng, base)})
    return predictions, {"images": images, "annotations": annotations, "type": "captions", "info": {},
                         "licenses": []}


@pytest.fixture
def write_json(tmp_path):
    """``write_json(name, value) -> path`` under the test's tmp_path."""

    def write(name: str, value) -> str:
        path = tmp_path / name
        path.write_text(json.dumps(value), encoding="utf-8")
        return str(path)

    return write
