"""Zero-shot text <-> video retrieval (MSRVTT style) of a BLIP or BLIP-2 stage-1 model.

Input: encoded video samples, one caption each, in batches of ``{"frames" [b, F, 3, S, S],
"frame_mask" [b, F] bool, "input_ids" [b, L], "attention_mask" [b, L], "video_ids" [b]}`` (the
trainer's video eval encoder writes these; several captions of one video share its id and its
frames are encoded once). Scores: :func:`vlmcore.blip.video_retrieval_scores` (BLIP: ITC of the
frame-averaged projections, ITM over the frames' tokens concatenated, ITC top ``k_test`` re-ranked) or
:func:`vlmcore.blip2.video.video_retrieval_scores` (the Q-Former over the frames' tokens
concatenated); metrics: :func:`vlmcore.retrieval.video_retrieval_metrics`.

Ties: a correct answer ranks after every other candidate with an equal score (pessimistic; BLIP's
``np.argsort`` leaves their order to the sort). In particular, a query whose correct answer is outside
its ITC top ``k_test`` shares the -100 score of the other unranked candidates and ranks after all of
them, so Recall@k never counts it for ``k <= N - 1`` and its rank is the same on every machine.

Command line: ``vlmcore-eval video-retrieval --run RUN_DIR --data SHARDS --frames 8 --k-test 128``
(:func:`register`) scores a run directory through its run loader's ``LoadedRun.videos``
(:mod:`vlmcore.eval.run`; this library does not import the trainer).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence

import torch

from vlmcore._checks import check_positive_int
from vlmcore.blip import BLIP, video_retrieval_scores
from vlmcore.blip2 import Blip2Stage1
from vlmcore.blip2.video import video_retrieval_scores as blip2_video_retrieval_scores
from vlmcore.eval.inputs import EvalInputError
from vlmcore.eval.run import load_run
from vlmcore.retrieval import video_retrieval_metrics

FIELDS = ("frames", "frame_mask", "input_ids", "attention_mask", "video_ids")


def _concatenated(batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """Every batch's :data:`FIELDS` concatenated along the first dimension (a missing field is named)."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in FIELDS}
    for batch in batches:
        missing = [name for name in FIELDS if name not in batch]
        if missing:
            raise ValueError(f"a video retrieval batch lacks {missing}: it needs {list(FIELDS)}")
        for name in FIELDS:
            parts[name].append(batch[name])
    if not parts["frames"]:
        raise ValueError("video retrieval got no batch: the eval set holds no usable video")
    return {name: torch.cat(values) for name, values in parts.items()}


def videos_of_captions(video_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first [N_vid], text_to_video [N_txt])`` int64 on the CPU: each distinct video's first caption row,
    videos numbered in order of first appearance, and the video index of every caption."""
    index: dict[int, int] = {}
    first, text_to_video = [], []
    for row, video in enumerate(video_ids.tolist()):  # one host read of the ids
        if video not in index:
            index[video] = len(first)
            first.append(row)
        text_to_video.append(index[video])
    return torch.tensor(first, dtype=torch.long), torch.tensor(text_to_video, dtype=torch.long)


@torch.no_grad()
def video_retrieval(model: BLIP | Blip2Stage1, batches: Iterable[dict], *, k_test: int = 128, batch_size: int = 16,
                    ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k and ranks of text -> video and video -> text retrieval over ``batches`` (module docstring).

    Args:
        model: a :class:`vlmcore.blip.BLIP` or a :class:`vlmcore.blip2.Blip2Stage1` with its vision encoder,
            in eval mode; the tensors are moved to its device and dtype.
        k_test: candidates re-ranked by ITM per query (BLIP's MSRVTT setting: 128).
        batch_size: videos per image-encoder pass.

    Returns:
        :func:`vlmcore.retrieval.video_retrieval_metrics` plus ``"eval_videos"`` and ``"eval_captions"``.
    """
    data = _concatenated(batches)
    param = next(model.parameters())
    first, text_to_video = videos_of_captions(data["video_ids"])
    frames = data["frames"][first].to(param.device, param.dtype)
    frame_mask = data["frame_mask"][first].to(param.device)
    ids, mask = data["input_ids"].to(param.device), data["attention_mask"].to(param.device)
    if isinstance(model, BLIP):
        score_v2t, score_t2v = video_retrieval_scores(model, frames, ids, mask, frame_mask, k_test=k_test,
                                                      batch_size=batch_size)
    elif isinstance(model, Blip2Stage1):
        scores = blip2_video_retrieval_scores(model, frames, ids, mask, frame_mask, k=k_test, batch_size=batch_size)
        score_v2t, score_t2v = scores["itm_i2t"], scores["itm_t2i"]
    else:
        raise TypeError(f"model must be a vlmcore BLIP or Blip2Stage1 for video retrieval, got {type(model).__name__}")
    return {**video_retrieval_metrics(score_v2t, score_t2v, text_to_video, ks), "eval_videos": len(first),
            "eval_captions": len(text_to_video)}


def video_retrieval_from_run(run_dir: str, data: str, *, frames: int = 8, k_test: int = 128, batch_size: int = 16,
                             max_videos: int = 0, device: str = "cpu") -> dict:
    """:func:`video_retrieval` of the model of ``run_dir`` on the video shards ``data`` (``frames`` per clip,
    the first ``max_videos`` usable samples, 0 = all), with the counts of usable and skipped samples.

    A run directory that cannot be loaded raises ``EvalInputError("run_dir", ...)``; missing shards or shards
    without a usable clip ``EvalInputError("data", ...)`` (raised by the run loader)."""
    for name, value in (("frames", frames), ("k_test", k_test), ("batch_size", batch_size)):
        check_positive_int(name, value)
    if isinstance(max_videos, bool) or not isinstance(max_videos, int) or max_videos < 0:
        raise ValueError(f"max_videos must be an int >= 0 (0 = all), got {max_videos!r}")
    try:
        run = load_run(run_dir, device)
    except (OSError, ValueError) as e:
        raise EvalInputError("run_dir", str(e)) from None
    if run.videos is None:
        raise EvalInputError("run_dir", "its task scores no videos (video retrieval: a blip_retrieval or "
                                        "blip2_stage1 run)")
    batches, counts = run.videos(data, frames, batch_size, max_videos)
    metrics = video_retrieval(run.model, batches, k_test=k_test, batch_size=batch_size)
    return {**metrics, **counts, "frames": frames, "k_test": k_test}


def _count(minimum: int):
    """An argparse type: an int >= ``minimum`` (argparse names the option in its error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = "int"  # argparse's message for a non-int: "invalid int value"
    return parse


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``video-retrieval`` to ``vlmcore-eval``'s subparsers (handler: ``run``, see :mod:`vlmcore.eval.cli`)."""
    p = subparsers.add_parser("video-retrieval", help="zero-shot text <-> video Recall@k of a BLIP retrieval or "
                              "BLIP-2 stage-1 run (frames concatenated, ITC top-k re-ranked by ITM)",
                              description=__doc__.split("\n")[0])
    p.add_argument("--run", dest="run_dir", required=True, help="run directory (config.json + exported weights)")
    p.add_argument("--data", required=True, help="video shards (pattern or list): KEY.mp4 (or frames) + KEY.txt, "
                                                 "optional KEY.json {\"video_id\"} to group captions of one video")
    p.add_argument("--frames", type=_count(1), default=8, help="frames per clip, segment centres (BLIP: 8)")
    p.add_argument("--k-test", type=_count(1), default=128, help="ITC candidates re-ranked by ITM (BLIP MSRVTT: 128)")
    p.add_argument("--batch-size", type=_count(1), default=16, help="clips per encoder pass")
    p.add_argument("--max-videos", type=_count(0), default=0, help="first N usable samples only (0 = all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(run=lambda args: video_retrieval_from_run(
        args.run_dir, args.data, frames=args.frames, k_test=args.k_test, batch_size=args.batch_size,
        max_videos=args.max_videos, device=args.device))
    return p


__all__ = ["FIELDS", "register", "video_retrieval", "video_retrieval_from_run", "videos_of_captions"]
