"""``vlmcore-convert``: VQAv2 and NLVR2 as the datasets ship them -> shards of the ``vqa`` / ``nlvr`` kinds.

- ``vlmcore-convert vqav2 --questions Q.json --annotations A.json --images DIR --out OUT [--split train]``:
  VQAv2's questions + annotations files (``v2_OpenEnded_mscoco_train2014_questions.json``,
  ``v2_mscoco_train2014_annotations.json``) and the COCO image folder -> one sample per question
  (``KEY.jpg`` + ``KEY.txt`` the question + ``KEY.json`` ``{question_id, image_id, question, answers
  (the 10 raw answers), question_type, answer_type}``), and ``answer_list.json``: the
  ``--answer-list-size`` most frequent answers (BLIP's rank inference list holds 3,128);
- ``vlmcore-convert nlvr2 --jsonl dev.json --images DIR --out OUT [--split dev]``: NLVR2's jsonl
  (``{"identifier": "dev-850-0-0", "sentence", "label": "True", "directory": 3 (train only)}``) and its
  image folder (``[directory/]dev-850-0-img0.png`` / ``img1``) -> ``KEY.left.png`` + ``KEY.right.png``
  + ``KEY.txt`` + ``KEY.json`` ``{identifier, sentence, label}``.

Shards are ``OUT/<split>-000000.tar``, ... (``train/data/tar_writer.py``); the input checks are
:mod:`vlmcore.eval.inputs`' (an ``EvalInputError`` naming the file's role).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter

from vlmcore.train.data.tar_writer import ShardWriter

from vlmcore.eval.inputs import EvalInputError, require_keys
from vlmcore.eval.prepare import read_image_file, vqa_records


def _key(value) -> str:
    return str(value).replace(".", "_")  # WebDataset splits a member name at its first dot


def convert_vqav2(questions_json: str, annotations_json: str, image_root: str, out_dir: str, split: str = "train",
                  image_name: str = "COCO_{data_subtype}_{image_id:012d}.jpg", answer_list_size: int = 3128,
                  shard_size: int = 1000) -> dict:
    """VQAv2 files -> ``vqa`` shards + ``answer_list.json`` (module docstring); returns a summary."""
    _, _, records = vqa_records(questions_json, annotations_json, image_name)
    os.makedirs(out_dir, exist_ok=True)
    writer, frequency = ShardWriter(out_dir, split, shard_size), Counter()
    for meta, name in records:
        qid = meta["question_id"]
        frequency.update(meta["answers"])
        ext, image = read_image_file(image_root, name, f"question_id {qid}")
        writer.write(_key(qid), {ext: image, "txt": meta["question"].encode(), "json": json.dumps(meta).encode()})
    writer.close()
    answer_list = [a for a, _ in frequency.most_common(answer_list_size)]
    path = os.path.join(out_dir, "answer_list.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(answer_list, f, ensure_ascii=False)
    return {"shards": writer.paths, "samples": writer.count, "answer_list": path, "answers": len(answer_list)}


def _nlvr_images(row: dict, image_root: str, where: str) -> tuple[tuple[str, bytes], tuple[str, bytes]]:
    """The left / right images of an NLVR2 row: ``[directory/]<identifier without its last part>-img{0,1}.png``."""
    stem = str(row["identifier"]).rsplit("-", 1)[0]
    folder = str(row["directory"]) if "directory" in row else ""
    return tuple(read_image_file(image_root, os.path.join(folder, f"{stem}-img{i}.png"), where) for i in (0, 1))


def convert_nlvr2(jsonl_path: str, image_root: str, out_dir: str, split: str = "dev", shard_size: int = 1000) -> dict:
    """NLVR2 jsonl + images -> ``nlvr`` shards (module docstring); returns a summary."""
    try:
        with open(jsonl_path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise EvalInputError("jsonl", f"cannot read the file: {e.strerror}") from e
    if not lines:
        raise EvalInputError("jsonl", "no line")
    os.makedirs(out_dir, exist_ok=True)
    writer = ShardWriter(out_dir, split, shard_size)
    for n, line in lines:
        try:
            row = json.loads(line)
        except ValueError as e:
            raise EvalInputError("jsonl", f"line {n} is not JSON: {e}") from e
        require_keys(row, ("identifier", "sentence", "label"), "jsonl", f"line {n}")
        if row["label"] not in ("True", "False"):
            raise EvalInputError("jsonl", f"line {n}: label must be \"True\" or \"False\", got {row['label']!r}")
        (left_ext, left), (right_ext, right) = _nlvr_images(row, image_root, f"line {n}")
        meta = {"identifier": row["identifier"], "sentence": row["sentence"], "label": row["label"] == "True"}
        writer.write(_key(row["identifier"]), {f"left.{left_ext}": left, f"right.{right_ext}": right,
                                               "txt": row["sentence"].encode(), "json": json.dumps(meta).encode()})
    writer.close()
    return {"shards": writer.paths, "samples": writer.count}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vlmcore-convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    vqa = sub.add_parser("vqav2", help="VQAv2 questions + annotations + COCO images -> kind: vqa shards")
    vqa.add_argument("--questions", required=True)
    vqa.add_argument("--annotations", required=True)
    vqa.add_argument("--image-name", default="COCO_{data_subtype}_{image_id:012d}.jpg")
    vqa.add_argument("--answer-list-size", type=int, default=3128)
    nlvr = sub.add_parser("nlvr2", help="NLVR2 jsonl + images -> kind: nlvr shards")
    nlvr.add_argument("--jsonl", required=True)
    for p, split in ((vqa, "train"), (nlvr, "dev")):
        p.add_argument("--images", required=True, help="the image folder")
        p.add_argument("--out", required=True, help="the output folder")
        p.add_argument("--split", default=split, help="the shards' name prefix")
        p.add_argument("--shard-size", type=int, default=1000)
    return parser.parse_args(argv)


def console_main(argv: list[str] | None = None) -> None:
    """Convert and print the summary (JSON); a bad input exits with its file's role and the problem."""
    args = parse_args(argv)
    try:
        if args.dataset == "vqav2":
            summary = convert_vqav2(args.questions, args.annotations, args.images, args.out, args.split,
                                    args.image_name, args.answer_list_size, args.shard_size)
        else:
            summary = convert_nlvr2(args.jsonl, args.images, args.out, args.split, args.shard_size)
    except EvalInputError as e:
        raise SystemExit(f"vlmcore-convert {args.dataset}: {e.role}: {e}") from None
    print(json.dumps(summary))


if __name__ == "__main__":
    console_main()
