"""``score-captions`` is COCOEvalCap: the same numbers (1e-9) on 120 captions, and clear errors on bad files."""

import json

import pytest

pytest.importorskip("pycocoevalcap", reason="caption scoring needs the eval extra (pycocoevalcap)")
pytest.importorskip("pycocotools", reason="the reference run needs pycocotools")

from vlmcore.eval.captions import CAPTION_METRICS  # noqa: E402
from vlmcore.eval.cli import main  # noqa: E402


def _run_cli(argv, capsys) -> tuple[int, dict | None, str]:
    """``(exit status, the JSON object of stdout's last line or None, stderr)`` of one in-process run."""
    status = main(argv)
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return status, (json.loads(lines[-1]) if lines else None), err


def _cocoevalcap(predictions_path: str, references_path: str, monkeypatch) -> dict:
    """COCOEvalCap.evaluate() as OpenFlamingo's compute_cider calls it, SPICE stubbed out (it downloads)."""
    import pycocoevalcap.eval as cap_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(cap_eval, "Spice", NoSpice)
    coco = COCO(references_path)
    result = coco.loadRes(predictions_path)
    evaluator = cap_eval.COCOEvalCap(coco, result)
    evaluator.params["image_id"] = result.getImgIds()
    evaluator.evaluate()
    return evaluator.eval


@pytest.mark.slow  # Java: the PTB tokenizer four times and METEOR twice (~1 min on a shared 2-core machine)
def test_score_captions_equals_cocoevalcap(caption_fixture, write_json, capsys, monkeypatch):
    """110 predictions for 120 reference images: the images without one are left out, as COCOEvalCap
    does with ``params["image_id"] = result.getImgIds()``."""
    predictions, references = caption_fixture
    predictions = predictions[:110]
    assert len(predictions) >= 100
    p, r = write_json("predictions.json", predictions), write_json("references.json", references)
    status, ours, _ = _run_cli(["score-captions", "--predictions", p, "--references", r], capsys)
    assert status == 0
    theirs = _cocoevalcap(p, r, monkeypatch)
    for name in CAPTION_METRICS:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9, rel=0), name
    assert ours["images"] == len(predictions)
    assert 0.05 < ours["CIDEr"] < 10  # a real score, not a degenerate 0 / nan


@pytest.mark.parametrize("case, role, words", [
    ("missing_caption", "predictions", ["entry 1", "'caption'"]),
    ("unknown_image", "predictions", ["entry 0", "image_id 5", "not in the references"]),
    ("duplicate", "predictions", ["entry 1", "second caption"]),
    ("empty", "predictions", ["empty"]),
    ("references_without_images", "references", ["'images'"]),
])
def test_bad_files_exit_2_naming_file_and_entry(case, role, words, write_json, capsys):
    predictions = [{"image_id": 1, "caption": "a dog"}, {"image_id": 2, "caption": "a cat"}]
    references = {"images": [{"id": 1}, {"id": 2}],
                  "annotations": [{"image_id": 1, "id": 0, "caption": "a dog"},
                                  {"image_id": 2, "id": 1, "caption": "a cat"}]}
    if case == "missing_caption":
        del predictions[1]["caption"]
    elif case == "unknown_image":
        predictions[0]["image_id"] = 5
    elif case == "duplicate":
        predictions[1]["image_id"] = 1
    elif case == "empty":
        predictions = []
    else:
        del references["images"]
    paths = {"predictions": write_json("p.json", predictions), "references": write_json("r.json", references)}
    status, out, err = _run_cli(["score-captions", "--predictions", paths["predictions"],
                                 "--references", paths["references"]], capsys)
    assert status == 2 and out is None
    assert err.count("\n") == 1 and err.startswith(f"vlmcore-eval: error: {paths[role]}: "), err
    for word in words:
        assert word in err, err


def test_unreadable_json_names_the_file(tmp_path, write_json, capsys):
    bad = tmp_path / "p.json"
    bad.write_text("[{", encoding="utf-8")
    status, _, err = _run_cli(["score-captions", "--predictions", str(bad), "--references",
                               write_json("r.json", {"images": [], "annotations": []})], capsys)
    assert status == 2 and f"{bad}: not valid JSON" in err


def test_spice_without_its_jars_fails_clearly(write_json, capsys, monkeypatch, tmp_path):
    import pycocoevalcap

    monkeypatch.setattr(pycocoevalcap, "__file__", str(tmp_path / "pycocoevalcap" / "__init__.py"))  # no jars there
    predictions = [{"image_id": 1, "caption": "a dog"}]
    references = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "id": 0, "caption": "a dog runs"}]}
    status, out, err = _run_cli(["score-captions", "--spice", "--predictions", write_json("p.json", predictions),
                                 "--references", write_json("r.json", references)], capsys)
    assert status == 2 and out is None
    assert "SPICE needs Stanford CoreNLP" in err and "--spice" in err
