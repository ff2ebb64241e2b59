"""The config reference in docs/training/config.md is the generator's output (so it cannot drift from the schema)."""

import os

from vlmcore.train.tasks import task_names
from vlmcore.train.tools.config_reference import REFERENCE_BEGIN, REFERENCE_END, REFERENCE_FILE, reference_markdown

REFERENCE_PAGE = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, REFERENCE_FILE)


def test_readme_reference_equals_the_generated_table():
    with open(REFERENCE_PAGE, encoding="utf-8") as f:
        text = f.read()
    begin, end = text.index(REFERENCE_BEGIN) + len(REFERENCE_BEGIN), text.index(REFERENCE_END)
    assert text[begin:end] == "\n" + reference_markdown(), (
        f"{REFERENCE_FILE}'s config reference is stale: run "
        f"`python -m vlmcore.train.tools.config_reference {REFERENCE_FILE}`")


def test_reference_covers_every_key_with_help():
    table = reference_markdown()
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    keys = {row[0].strip("| `") for row in rows}
    for key in ("task", "data.train[].weight", "optim.accumulation_steps", "optim.schedule", "epochs",
                "train_num_samples", "precision", "model.vision.unlocked_layers", "model.clip.text.lock",
                "model.flamingo.mask_text_before_first_image", "deepspeed"):
        assert key in keys, key
    for name in task_names():  # every registered task's section
        assert f"model.{name}" in keys
    assert all(row[3].strip(" |") for row in rows), [row[0] for row in rows if not row[3].strip(" |")]
