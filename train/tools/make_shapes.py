"""``vlmcore-make-shapes``: write the shapes dataset (:mod:`vlmcore.train.tools.shapes`), or with
``--regions`` its region-feature variant (:mod:`vlmcore.train.tools.region_shapes`), or with
``--video`` its moving-shapes clips (:mod:`vlmcore.train.tools.video_shapes`)."""

from __future__ import annotations

import argparse
import json

from vlmcore.train.tools.region_shapes import make_region_shapes
from vlmcore.train.tools.shapes import make_shapes
from vlmcore.train.tools.video_shapes import VIDEO_FORMATS, make_video_shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's flags (``--help``)."""
    parser = argparse.ArgumentParser(
        prog="vlmcore-make-shapes",
        description="The embedded dataset: procedurally drawn coloured shapes as WebDataset shards.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, default=4000, help="training image-text pairs")
    parser.add_argument("--n-eval", type=int, default=480, help="held-out pairs (other sizes/positions/backgrounds)")
    parser.add_argument("--n-docs", type=int, default=1000, help="interleaved documents (1-3 images each)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--regions", action="store_true",
                        help="write the region-feature variant (KEY.npz, for ViLBERT / VL-BERT) instead")
    parser.add_argument("--feature-dim", type=int, default=2048, help="--regions: region feature width")
    parser.add_argument("--video", action="store_true",
                        help="write moving-shapes clips (video-{train,eval}-*.tar, captions '... moving left') instead")
    parser.add_argument("--video-format", choices=VIDEO_FORMATS, default="mp4",
                        help="--video: KEY.mp4 (PyAV, pip install vlmcore[video]), KEY.frame000.png ... or KEY.npy")
    parser.add_argument("--num-frames", type=int, default=8, help="--video: frames per clip")
    return parser.parse_args(argv)


def console_main(argv: list[str] | None = None) -> None:
    """``vlmcore-make-shapes --out DIR --n N [--regions | --video]``: write the set and print its summary (JSON)."""
    args = parse_args(argv)
    if args.regions and args.video:
        raise SystemExit("vlmcore-make-shapes: --regions and --video write different sets; pick one")
    if args.video:
        summary = make_video_shapes(args.out, args.n, args.n_eval, args.num_frames, args.image_size, args.shard_size,
                                    args.seed, args.video_format)
    elif args.regions:
        summary = make_region_shapes(args.out, args.n, args.n_eval, args.image_size, args.feature_dim,
                                     shard_size=args.shard_size, seed=args.seed)
    else:
        summary = make_shapes(args.out, args.n, args.n_eval, args.n_docs, args.image_size, args.shard_size,
                              args.seed)
    print(json.dumps(summary))


if __name__ == "__main__":
    console_main()
