"""``vlmcore-eval``: score prediction files and convert benchmarks (``python -m vlmcore.eval``).

Contract of every subcommand (scripts call it): the result is ONE JSON object on the last line of
stdout and the exit status is 0; an input that cannot be used prints one ``vlmcore-eval: error:``
line to stderr naming the file and the entry, and exits 2. Anything the scorers print (pycocoevalcap's
BLEU prints its n-gram counts) goes to stderr, so stdout holds only the result.

Subcommands register in :data:`SUBCOMMANDS`: a function that adds its parser to the subparsers and
sets ``run`` (``args -> dict``) with ``set_defaults``; adding a command is that function plus one entry.
An argument whose ``dest`` is an input role (``predictions``, ``references``, ``questions``,
``annotations``, ``source``, ``images``, ``run_dir``, ``data``) is the file an
:class:`~vlmcore.eval.inputs.EvalInputError` of that role names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from vlmcore.eval import prepare, run, video_retrieval
from vlmcore.eval.captions import score_captions
from vlmcore.eval.inputs import EvalInputError, MissingToolError, read_json
from vlmcore.eval.vqa import vqa_accuracy


def run_score_captions(args: argparse.Namespace) -> dict:
    predictions = read_json(args.predictions, "predictions")
    return score_captions(predictions, read_json(args.references, "references"), spice=args.spice)


def add_score_captions(subparsers) -> None:
    p = subparsers.add_parser("score-captions", help="COCOEvalCap metrics (CIDEr, BLEU, METEOR, ROUGE-L) of a "
                                                     "COCO results file")
    p.add_argument("--predictions", required=True, help="COCO results JSON: [{\"image_id\", \"caption\"}, ...]")
    p.add_argument("--references", required=True, help="COCO captions annotation JSON ({\"images\", \"annotations\"})")
    p.add_argument("--spice", action="store_true", help="also SPICE (needs Stanford CoreNLP's jars installed)")
    p.set_defaults(run=run_score_captions)


def run_score_vqa(args: argparse.Namespace) -> dict:
    predictions = read_json(args.predictions, "predictions")
    return vqa_accuracy(predictions, read_json(args.questions, "questions"),
                        read_json(args.annotations, "annotations"), okvqa_stemming=args.okvqa_stemming)


def add_score_vqa(subparsers) -> None:
    p = subparsers.add_parser("score-vqa", help="official VQA accuracy of a VQA results file")
    p.add_argument("--predictions", required=True, help="VQA results JSON: [{\"question_id\", \"answer\"}, ...]")
    p.add_argument("--questions", required=True, help="VQA questions JSON ({\"questions\": [...]})")
    p.add_argument("--annotations", required=True, help="VQA annotations JSON ({\"annotations\": [...]})")
    p.add_argument("--okvqa-stemming", action="store_true", help="stem predictions as OK-VQA does (needs nltk "
                                                                 "and its data, inflection)")
    p.set_defaults(run=run_score_vqa)


def _prepare_parser(datasets, name: str, help_text: str, run) -> argparse.ArgumentParser:
    p = datasets.add_parser(name, help=help_text)
    p.add_argument("--out", required=True, help="output folder (shards + ground truth)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    p.set_defaults(run=lambda args: {"dataset": name, **run(args)})
    return p


def add_prepare(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="convert a benchmark's files to shards + ground-truth files")
    datasets = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name in ("coco", "flickr30k"):
        q = _prepare_parser(datasets, name, f"{name} from Karpathy's split JSON", lambda a: prepare.prepare_karpathy(
            a.source, a.images, a.out, a.split, a.shard_size))
        q.add_argument("--karpathy", dest="source", required=True, help=f"dataset_{name}.json (Karpathy splits)")
        q.add_argument("--images", required=True, help="image root (COCO: holds train2014/ and val2014/)")
        q.add_argument("--split", default="test", help="train (with restval) | val | test")
    q = _prepare_parser(datasets, "nocaps", "NoCaps from its COCO-format captions JSON",
                        lambda a: prepare.prepare_coco_format(a.source, a.images, a.out, a.split, a.shard_size))
    q.add_argument("--captions", dest="source", required=True, help="nocaps_val_4500_captions.json")
    q.add_argument("--images", required=True, help="folder of the images' file_name")
    q.add_argument("--split", default="val", help="shard name prefix")
    for name in ("vqav2", "okvqa"):
        q = _prepare_parser(datasets, name, f"{name} from its question + annotation JSONs",
                            lambda a: prepare.prepare_vqa(a.questions, a.annotations, a.images, a.out, a.split,
                                                          a.image_name, a.shard_size))
        q.add_argument("--questions", required=True, help="questions JSON")
        q.add_argument("--annotations", required=True, help="annotations JSON")
        q.add_argument("--images", required=True, help="COCO image folder (e.g. val2014/)")
        q.add_argument("--image-name", default="COCO_{data_subtype}_{image_id:012d}.jpg",
                       help="image file name pattern ({data_subtype} from the questions file, {image_id})")
        q.add_argument("--split", default="val", help="shard name prefix")
    q = _prepare_parser(datasets, "hateful_memes", "HatefulMemes from a jsonl file (dev.jsonl)",
                        lambda a: prepare.prepare_hateful_memes(a.source, a.out, a.split, a.shard_size))
    q.add_argument("--jsonl", dest="source", required=True, help="dev.jsonl (its img/ folder beside it)")
    q.add_argument("--split", default="dev", help="shard name prefix")
    q = _prepare_parser(datasets, "imagenet", "ImageNet-1k from a <wnid>/<image> folder",
                        lambda a: prepare.prepare_imagenet(a.images, a.out, a.split, a.shard_size))
    q.add_argument("--images", required=True, help="the folder holding n01440764/, n01443537/, ...")
    q.add_argument("--split", default="val", help="shard name prefix")


#: Every subcommand's parser builder, in ``--help`` order.
SUBCOMMANDS = [add_score_captions, add_score_vqa, add_prepare, run.register, video_retrieval.register]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmcore-eval", description="Score prediction files in the field's own "
                                     "units and convert benchmarks to shards.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (0, or 2 for unusable inputs and usage errors)."""
    args = build_parser().parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = args.run(args)
    except EvalInputError as e:
        source = getattr(args, e.role, None)
        print(f"vlmcore-eval: error: {source or e.role}: {e}", file=sys.stderr)
        return 2
    except MissingToolError as e:  # an optional tool the request needs (SPICE's jars, NLTK's data)
        print(f"vlmcore-eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def console_main() -> None:
    sys.exit(main())
