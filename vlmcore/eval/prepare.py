"""Benchmark converters: the files a dataset ships -> our WebDataset shards + the ground truth the scorers read.

No downloads: each converter reads local files in the format the dataset distributes.

- ``coco``, ``flickr30k``: Karpathy's split JSON (``dataset_coco.json``, ...) + the image folder ->
  one sample per image, ``references.json`` (COCO captions annotation format);
- ``nocaps``: ``nocaps_val_4500_captions.json`` (COCO format) + the image folder -> per image, ``references.json``;
- ``vqav2``, ``okvqa``: the questions + annotations JSONs + the COCO image folder -> one sample per
  question, ``questions.json`` + ``annotations.json``;
- ``hateful_memes``: ``dev.jsonl`` (``{"id", "img", "label", "text"}`` lines, ``img/`` beside it) ->
  per meme, ``labels.json``;
- ``imagenet``: a ``<wnid>/<image>`` folder (``val/`` after the usual valprep) -> per image,
  ``labels.json`` and ``classes.json``.

Every sample has its image (``KEY.jpg`` / ``.png`` ...), a ``KEY.txt`` (first caption, the question, the
meme text, or "a photo of a {class}.") so it is also a valid ``pairs`` sample, and ``KEY.json`` with
the fields of its source (captions, answers, labels). ImageNet labels are the class indices of the
bundled wnid list (:func:`vlmcore.eval.zero_shot.imagenet_metadata`) and ``classes.json`` next to the
shards is the CLIP task's classes file. Tars are written with ``tarfile`` (fixed member metadata, so
the same files give the same bytes); the trainer's shard writer stays in the trainer's layer.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator

from vlmcore.eval.inputs import EvalInputError, read_json, require_keys, require_list
from vlmcore.eval.zero_shot import imagenet_metadata, zero_shot_classes

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
Sample = tuple[str, dict[str, bytes]]


def write_shards(samples: Iterable[Sample], out_dir: str, prefix: str, shard_size: int = 1000) -> tuple[list[str], int]:
    """Samples ``(key, {ext: bytes})`` -> ``out_dir/<prefix>-000000.tar``, ...; returns (paths, count)."""
    os.makedirs(out_dir, exist_ok=True)
    paths, count, tar = [], 0, None
    try:
        for key, members in samples:
            if count % shard_size == 0:
                if tar is not None:
                    tar.close()
                paths.append(os.path.join(out_dir, f"{prefix}-{len(paths):06d}.tar"))
                tar = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT)
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode = len(data), 0o644  # mtime, owner: 0 (TarInfo's defaults)
                tar.addfile(info, io.BytesIO(data))
            count += 1
    finally:
        if tar is not None:
            tar.close()
    if not count:
        raise EvalInputError("source", "no samples to write")
    return paths, count


def _write_json(path: str, value) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False)
    return path


def read_image_file(root: str, name: str, where: str) -> tuple[str, bytes]:
    """``(member extension, bytes)`` of the image file ``root/name``; missing or unknown -> EvalInputError."""
    ext = IMAGE_EXTENSIONS.get(os.path.splitext(name)[1].lower())
    if ext is None:
        raise EvalInputError("images", f"{where}: {name!r} is not a .jpg / .jpeg / .png / .webp image")
    try:
        with open(os.path.join(root, name), "rb") as f:
            return ext, f.read()
    except OSError as e:
        raise EvalInputError("images", f"{where}: cannot read {os.path.join(root, name)}: {e.strerror}") from e


def _sample(key, image: tuple[str, bytes], text: str, meta: dict) -> Sample:
    """One shard sample: the image, ``KEY.txt`` and ``KEY.json`` (keys hold no dots: WebDataset splits there)."""
    ext, data = image
    return str(key).replace(".", "_"), {ext: data, "txt": text.encode(), "json": json.dumps(meta).encode()}


def karpathy_images(karpathy: dict, split: str) -> list[dict]:
    """The entries of a Karpathy split file in ``split`` (``train`` includes ``restval``, as Karpathy's 113k)."""
    images = require_list(require_keys(karpathy, ("images",), "source", "the top-level object")["images"],
                          "source", "images")
    splits = {"train", "restval"} if split == "train" else {split}
    chosen = []
    for i, image in enumerate(images):
        require_keys(image, ("filename", "split", "sentences"), "source", f"images[{i}]")
        if image["split"] in splits:
            chosen.append(image)
    if not chosen:
        raise EvalInputError("source", f"no image in split {split!r}")
    return chosen


def _karpathy_id(image: dict) -> int:
    """COCO's id (``cocoid``); Flickr30k's file number (``1000092795.jpg``); else Karpathy's ``imgid``."""
    if "cocoid" in image:
        return image["cocoid"]
    stem = os.path.splitext(image["filename"])[0]
    return int(stem) if stem.isdigit() else image["imgid"]


def prepare_karpathy(karpathy_json: str, image_root: str, out_dir: str, split: str = "test",
                     shard_size: int = 1000) -> dict:
    """COCO / Flickr30k Karpathy split -> shards of ``split`` + ``references.json`` (COCO captions format)."""
    images = karpathy_images(read_json(karpathy_json, "source"), split)
    references: dict = {"images": [], "annotations": []}

    def samples() -> Iterator[Sample]:
        for image in images:
            image_id = _karpathy_id(image)
            name = os.path.join(image.get("filepath", ""), image["filename"])
            captions = [s["raw"] for s in image["sentences"] if isinstance(s, dict) and "raw" in s]
            if not captions:
                raise EvalInputError("source", f"image {image['filename']!r}: no sentence with a 'raw' caption")
            references["images"].append({"id": image_id, "file_name": name})
            references["annotations"] += [{"image_id": image_id, "id": len(references["annotations"]) + j,
                                           "caption": c} for j, c in enumerate(captions)]
            meta = {"image_id": image_id, "captions": captions, "file_name": name}
            yield _sample(image_id, read_image_file(image_root, name, f"image_id {image_id}"), captions[0], meta)

    paths, count = write_shards(samples(), out_dir, split, shard_size)
    return {"shards": paths, "samples": count, "references": _write_json(os.path.join(out_dir, "references.json"),
                                                                         references)}


def prepare_coco_format(annotations_json: str, image_root: str, out_dir: str, split: str = "val",
                        shard_size: int = 1000) -> dict:
    """A COCO captions annotation file (NoCaps ships its validation set so) -> shards + ``references.json``."""
    data = read_json(annotations_json, "source")
    require_keys(data, ("images", "annotations"), "source", "the top-level object")
    captions: dict = {}
    for i, ann in enumerate(require_list(data["annotations"], "source", "annotations")):
        captions.setdefault(require_keys(ann, ("image_id", "caption"), "source", f"annotations[{i}]")["image_id"],
                            []).append(ann["caption"])

    def samples() -> Iterator[Sample]:
        for i, image in enumerate(require_list(data["images"], "source", "images")):
            image_id = require_keys(image, ("id", "file_name"), "source", f"images[{i}]")["id"]
            if not captions.get(image_id):
                raise EvalInputError("source", f"images[{i}] (id {image_id!r}) has no caption")
            meta = {k: v for k, v in image.items() if k != "id"}
            meta.update(image_id=image_id, captions=captions[image_id])
            yield _sample(image_id, read_image_file(image_root, image["file_name"], f"image_id {image_id}"),
                          captions[image_id][0], meta)

    paths, count = write_shards(samples(), out_dir, split, shard_size)
    references = {"images": data["images"], "annotations": data["annotations"]}
    return {"shards": paths, "samples": count,
            "references": _write_json(os.path.join(out_dir, "references.json"), references)}


def vqa_records(questions_json: str, annotations_json: str, image_name: str = "COCO_{data_subtype}_{image_id:012d}.jpg"
                ) -> tuple[dict, dict, list[tuple[dict, str]]]:
    """VQAv2 / OK-VQA question + annotation files, checked and paired: ``(questions, annotations, records)``,
    one ``(meta, image file name)`` per question in the questions file's order. ``meta`` holds ``question_id``,
    ``image_id``, ``question``, ``answers`` (the annotators' raw list), ``question_type``, ``answer_type``;
    ``image_name`` formats the file name from ``image_id`` and the questions file's ``data_subtype``
    (``val2014`` for VQAv2 val and OK-VQA val: ``COCO_val2014_000000000042.jpg``). A question without an
    annotation, or an entry without its keys, is an :class:`EvalInputError` naming it."""
    questions, annotations = read_json(questions_json, "questions"), read_json(annotations_json, "annotations")
    asked = require_list(require_keys(questions, ("questions",), "questions", "the top-level object")["questions"],
                         "questions", "questions")
    answered = {}
    for i, ann in enumerate(require_list(require_keys(annotations, ("annotations",), "annotations",
                                                      "the top-level object")["annotations"],
                                         "annotations", "annotations")):
        require_keys(ann, ("question_id", "answers"), "annotations", f"annotations[{i}]")
        answers = require_list(ann["answers"], "annotations", f"answers of annotations[{i}]")
        answered[ann["question_id"]] = [require_keys(a, ("answer",), "annotations", f"annotations[{i}]")["answer"]
                                        for a in answers], ann
    subtype = questions.get("data_subtype", "")
    records = []
    for i, q in enumerate(asked):
        require_keys(q, ("question_id", "image_id", "question"), "questions", f"questions[{i}]")
        qid = q["question_id"]
        if qid not in answered:
            raise EvalInputError("annotations", f"question_id {qid!r} (questions[{i}]) has no annotation")
        answers, ann = answered[qid]
        meta = {"question_id": qid, "image_id": q["image_id"], "question": q["question"], "answers": answers,
                "question_type": ann.get("question_type"), "answer_type": ann.get("answer_type")}
        records.append((meta, image_name.format(data_subtype=subtype, image_id=q["image_id"])))
    return questions, annotations, records


def prepare_vqa(questions_json: str, annotations_json: str, image_root: str, out_dir: str, split: str = "val",
                image_name: str = "COCO_{data_subtype}_{image_id:012d}.jpg", shard_size: int = 1000) -> dict:
    """VQAv2 / OK-VQA question + annotation files -> one sample per question + copies of both files
    (``image_name``: see :func:`vqa_records`)."""
    questions, annotations, records = vqa_records(questions_json, annotations_json, image_name)

    def samples() -> Iterator[Sample]:
        for meta, name in records:
            qid = meta["question_id"]
            yield _sample(qid, read_image_file(image_root, name, f"question_id {qid}"), meta["question"], meta)

    paths, count = write_shards(samples(), out_dir, split, shard_size)
    return {"shards": paths, "samples": count,
            "questions": _write_json(os.path.join(out_dir, "questions.json"), questions),
            "annotations": _write_json(os.path.join(out_dir, "annotations.json"), annotations)}


def prepare_hateful_memes(jsonl_path: str, out_dir: str, split: str = "dev", shard_size: int = 1000) -> dict:
    """HatefulMemes ``dev.jsonl`` (images under its folder, ``"img": "img/42953.png"``) -> shards + ``labels.json``."""
    root = os.path.dirname(os.path.abspath(jsonl_path))
    try:
        with open(jsonl_path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise EvalInputError("source", f"cannot read the file: {e.strerror}") from e
    labels = []

    def samples() -> Iterator[Sample]:
        for n, line in lines:
            try:
                meme = json.loads(line)
            except ValueError as e:
                raise EvalInputError("source", f"line {n}: not valid JSON: {e}") from e
            require_keys(meme, ("id", "img", "text"), "source", f"line {n}")
            if "label" in meme:
                labels.append({"id": meme["id"], "label": meme["label"]})
            meta = {k: meme[k] for k in ("id", "img", "text", "label") if k in meme}
            image = read_image_file(root, meme["img"], f"line {n} (id {meme['id']})")
            yield _sample(meme["id"], image, meme["text"], meta)

    paths, count = write_shards(samples(), out_dir, split, shard_size)
    return {"shards": paths, "samples": count, "labels": _write_json(os.path.join(out_dir, "labels.json"), labels)}


def prepare_imagenet(folder: str, out_dir: str, split: str = "val", shard_size: int = 1000) -> dict:
    """An ImageNet ``<wnid>/<image>`` folder -> shards (label = the wnid's class index), ``labels.json``,
    and ``classes.json`` (bundled class names + OpenAI's 80 templates) next to the shards."""
    meta = imagenet_metadata()
    index = {wnid: i for i, wnid in enumerate(meta["wnids"])}
    try:
        wnids = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    except OSError as e:
        raise EvalInputError("images", f"cannot list the folder: {e.strerror}") from e
    unknown = [d for d in wnids if d not in index]
    if unknown or not wnids:
        raise EvalInputError("images", f"expected ImageNet-1k wnid folders (n01440764, ...); found {unknown or 'none'}")
    labels = []

    def samples() -> Iterator[Sample]:
        for wnid in wnids:
            for name in sorted(os.listdir(os.path.join(folder, wnid))):
                label, key = index[wnid], os.path.splitext(name)[0]
                labels.append({"key": key, "label": label})
                text = f"a photo of a {meta['classnames'][label]}."
                yield _sample(key, read_image_file(folder, os.path.join(wnid, name), f"class {wnid}"), text,
                              {"label": label, "wnid": wnid, "file_name": os.path.join(wnid, name)})

    paths, count = write_shards(samples(), out_dir, split, shard_size)
    return {"shards": paths, "samples": count, "labels": _write_json(os.path.join(out_dir, "labels.json"), labels),
            "classes": _write_json(os.path.join(out_dir, "classes.json"), zero_shot_classes("imagenet"))}
