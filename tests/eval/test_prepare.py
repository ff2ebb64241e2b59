"""Each ``vlmcore-eval prepare`` converter round-trips a tiny fixture in the dataset's real format:
the shards hold every image byte for byte with its text and fields, and the ground truth is readable."""

import io
import json
import os
import tarfile

import pytest
from PIL import Image

from vlmcore.eval.cli import main
from vlmcore.eval.vqa import vqa_accuracy


def _image_file(path, colour, fmt="JPEG") -> bytes:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buffer, fmt)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    return buffer.getvalue()


def _read_shards(paths) -> dict[str, dict[str, bytes]]:
    """``{key: {ext: bytes}}`` of every sample in the shards."""
    samples: dict = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _prepare(argv, capsys) -> dict:
    status = main(["prepare", *argv])
    out, err = capsys.readouterr()
    assert status == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _sentences(*raw):
    return [{"raw": r, "tokens": r.lower().strip(".").split(), "imgid": 0, "sentid": i} for i, r in enumerate(raw)]


def test_coco_karpathy_round_trip(tmp_path, capsys):
    splits = ((42, "test"), (73, "train"), (74, "restval"), (99, "test"))
    images = {cocoid: _image_file(tmp_path / "coco" / "val2014" / f"COCO_val2014_{cocoid:012d}.jpg", (cocoid, 0, 0))
              for cocoid, _ in splits}
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": f"COCO_val2014_{cocoid:012d}.jpg", "imgid": i, "split": split,
         "cocoid": cocoid, "sentids": [0, 1], "sentences": _sentences(f"A dog number {cocoid}.", "Two dogs.")}
        for i, (cocoid, split) in enumerate(splits)]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    for split, expected in (("test", [42, 99]), ("train", [73, 74])):
        out = tmp_path / f"out_{split}"
        result = _prepare(["coco", "--karpathy", str(tmp_path / "dataset_coco.json"), "--images",
                           str(tmp_path / "coco"), "--out", str(out), "--split", split, "--shard-size", "1"], capsys)
        assert result["dataset"] == "coco" and result["samples"] == 2 and len(result["shards"]) == 2
        samples = _read_shards(result["shards"])
        assert sorted(samples) == [str(i) for i in expected]
        for cocoid in expected:
            sample = samples[str(cocoid)]
            assert sample["jpg"] == images[cocoid]
            assert sample["txt"].decode() == f"A dog number {cocoid}."
            assert json.loads(sample["json"])["captions"] == [f"A dog number {cocoid}.", "Two dogs."]
        references = json.loads((out / "references.json").read_text())
        assert [i["id"] for i in references["images"]] == expected
        assert [(a["image_id"], a["caption"]) for a in references["annotations"]] == [
            (i, c) for i in expected for c in (f"A dog number {i}.", "Two dogs.")]
        assert len({a["id"] for a in references["annotations"]}) == 4


def test_flickr30k_uses_the_file_number_as_image_id(tmp_path, capsys):
    data = _image_file(tmp_path / "flickr" / "1000092795.jpg", (0, 9, 0))
    karpathy = {"dataset": "flickr30k", "images": [{"filename": "1000092795.jpg", "imgid": 0, "split": "test",
                                                     "sentids": [0], "sentences": _sentences("Two young guys.")}]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    result = _prepare(["flickr30k", "--karpathy", str(tmp_path / "dataset_flickr30k.json"), "--images",
                       str(tmp_path / "flickr"), "--out", str(tmp_path / "out")], capsys)
    assert _read_shards(result["shards"])["1000092795"]["jpg"] == data
    references = json.loads(open(result["references"]).read())
    assert references["images"] == [{"id": 1000092795, "file_name": "1000092795.jpg"}]


def test_nocaps_round_trip(tmp_path, capsys):
    data = _image_file(tmp_path / "nocaps" / "0013ea2087020901.jpg", (1, 2, 3))
    nocaps = {"licenses": [], "info": {"version": "0.1"},
              "images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "open_images_id": "0013ea2087020901",
                          "height": 6, "width": 8, "domain": "in-domain"}],
              "annotations": [{"image_id": 0, "id": i, "caption": f"caption {i}"} for i in range(10)]}
    (tmp_path / "nocaps_val_4500_captions.json").write_text(json.dumps(nocaps))
    result = _prepare(["nocaps", "--captions", str(tmp_path / "nocaps_val_4500_captions.json"), "--images",
                       str(tmp_path / "nocaps"), "--out", str(tmp_path / "out")], capsys)
    sample = _read_shards(result["shards"])["0"]
    assert sample["jpg"] == data and json.loads(sample["json"])["domain"] == "in-domain"
    references = json.loads(open(result["references"]).read())
    assert references == {"images": nocaps["images"], "annotations": nocaps["annotations"]}


@pytest.mark.parametrize("dataset", ["vqav2", "okvqa"])
def test_vqa_round_trip_and_ground_truth_scores(dataset, tmp_path, capsys):
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014"}
    questions = {**header, "questions": [{"image_id": 42, "question": "What colour is the dog?", "question_id": 420},
                                         {"image_id": 42, "question": "How many dogs?", "question_id": 421}]}
    answer_lists = {420: ["brown"] * 7 + ["black"] * 3, 421: ["2"] * 10}
    annotations = {**header, "annotations": [
        {"question_id": qid, "image_id": 42, "question_type": "what", "answer_type": "other",
         "multiple_choice_answer": answers[0],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)]}
        for qid, answers in answer_lists.items()]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    data = _image_file(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg", (5, 5, 5))
    result = _prepare([dataset, "--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"),
                       "--images", str(tmp_path / "val2014"), "--out", str(tmp_path / "out")], capsys)
    samples = _read_shards(result["shards"])
    assert sorted(samples) == ["420", "421"]
    assert samples["420"]["jpg"] == data and samples["420"]["txt"] == b"What colour is the dog?"
    assert json.loads(samples["420"]["json"])["answers"] == answer_lists[420]
    written_q, written_a = (json.loads(open(result[k]).read()) for k in ("questions", "annotations"))
    assert written_q == questions and written_a == annotations
    predictions = [{"question_id": 420, "answer": "Brown."}, {"question_id": 421, "answer": "two"}]
    assert vqa_accuracy(predictions, written_q, written_a)["accuracy"] == pytest.approx(100.0)


def test_hateful_memes_round_trip(tmp_path, capsys):
    memes = [{"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character not their color"},
             {"id": 23058, "img": "img/23058.png", "label": 1, "text": "don't be afraid"}]
    data = {m["id"]: _image_file(tmp_path / "hm" / m["img"], (m["label"], 0, 0), "PNG") for m in memes}
    (tmp_path / "hm" / "dev.jsonl").write_text("".join(json.dumps(m) + "\n" for m in memes))
    result = _prepare(["hateful_memes", "--jsonl", str(tmp_path / "hm" / "dev.jsonl"), "--out",
                       str(tmp_path / "out")], capsys)
    samples = _read_shards(result["shards"])
    for meme in memes:
        sample = samples[str(meme["id"])]
        assert sample["png"] == data[meme["id"]] and sample["txt"].decode() == meme["text"]
        assert json.loads(sample["json"]) == meme
    assert json.loads(open(result["labels"]).read()) == [{"id": 42953, "label": 0}, {"id": 23058, "label": 1}]


def test_imagenet_round_trip_with_bundled_classes(tmp_path, capsys):
    files = {("n01440764", "ILSVRC2012_val_00000293"): 0, ("n01443537", "ILSVRC2012_val_00000236"): 1,
             ("n15075141", "ILSVRC2012_val_00000108"): 999}
    data = {key: _image_file(tmp_path / "val" / wnid / f"{key}.JPEG", (label % 256, 1, 1))
            for (wnid, key), label in files.items()}
    result = _prepare(["imagenet", "--images", str(tmp_path / "val"), "--out", str(tmp_path / "out")], capsys)
    samples = _read_shards(result["shards"])
    for (wnid, key), label in files.items():
        assert samples[key]["jpg"] == data[key]
        assert json.loads(samples[key]["json"])["label"] == label and json.loads(samples[key]["json"])["wnid"] == wnid
    assert samples["ILSVRC2012_val_00000293"]["txt"] == b"a photo of a tench."
    classes = json.loads(open(result["classes"]).read())
    assert len(classes["classnames"]) == 1000 and len(classes["templates"]) == 80
    assert os.path.dirname(result["classes"]) == os.path.dirname(result["shards"][0])  # where the clip task looks
    labels = json.loads(open(result["labels"]).read())
    assert sorted((e["key"], e["label"]) for e in labels) == sorted((k, v) for (_, k), v in files.items())


def test_a_missing_image_exits_2_naming_the_folder_and_entry(tmp_path, capsys):
    karpathy = {"images": [{"filename": "1.jpg", "imgid": 0, "split": "test", "sentences": _sentences("A cat.")}]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    (tmp_path / "images").mkdir()
    status = main(["prepare", "flickr30k", "--karpathy", str(tmp_path / "k.json"), "--images",
                   str(tmp_path / "images"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(f"vlmcore-eval: error: {tmp_path / 'images'}: image_id 1: cannot read")
    (tmp_path / "val" / "not_a_wnid").mkdir(parents=True)
    assert main(["prepare", "imagenet", "--images", str(tmp_path / "val"), "--out", str(tmp_path / "o2")]) == 2
    assert "expected ImageNet-1k wnid folders" in capsys.readouterr().err
