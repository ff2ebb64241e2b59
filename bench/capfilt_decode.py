"""``python -m vlmcore.bench capfilt-decode``: CapFilt's captioning throughput, KV-cached vs uncached.

CapFilt (``vlmcore-capfilt``) captions every web image, so its cost is ``BLIP.generate``: the image
encoder once per image, then one decoder call per token. This times that call as CapFilt makes it
(prompt "a picture of " = 4 ids after ``[DEC]``, nucleus sampling ``top_p=0.9`` or 3 beams, one
caption per image) with ``use_cache=True`` (the :class:`vlmcore.blip.text.DecoderCache`) and
``use_cache=False`` (every step re-runs the caption and re-projects the image keys / values), on a
random-init BLIP of each shape:

- ``demo``: the CPU demo's BLIP (``blip_*_tiny.yaml``: ViT 32 px / patch 8, width 64, depth 3;
  text width 64, 2 layers) with the demo's CapFilt settings (batch 64, max_length 12, min_length 4);
- ``base``: BLIP-base (ViT-B/16 at 224 px, BERT-base text, vocab 30524) with CapFilt's defaults
  (max_length 30, min_length 5), batch 2: about a minute per round (both providers) on one thread
  of a loaded CPU, so it is opt-in (``--shape base``).

The two providers take turns within each repeat (the machine is shared: both see the same load), and
each repeat checks that they produced the same tokens. Reported: captions/s, median and min / max
over the repeats, the speed-up of the medians, and the 1-minute load average before and after.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from vlmcore.blip import BLIP, build_blip

PROMPT_IDS = [5, 6, 7, 8]  # four ids, as "a picture of " tokenizes in BLIP's BERT vocabulary
SHAPES = {
    "demo": dict(vision=dict(image_size=32, patch_size=8, width=64, depth=3, heads=4),
                 text=dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=32, encoder_width=64, bos_token_id=62,
                           enc_token_id=63, sep_token_id=2),
                 batch=64, max_length=12, min_length=4),
    "base": dict(vision=dict(image_size=224, patch_size=16, width=768, depth=12, heads=12),
                 text=dict(max_position_embeddings=512, encoder_width=768),
                 batch=2, max_length=30, min_length=5),
}
DECODINGS = {"nucleus": dict(do_sample=True, top_p=0.9), "beam": dict(num_beams=3)}


def build_captioner(shape: str) -> BLIP:
    """A random-init BLIP of ``SHAPES[shape]`` for inference (no momentum encoders, no queues)."""
    spec = SHAPES[shape]
    torch.manual_seed(0)
    return build_blip({"vision": {"kind": "vit", **spec["vision"]}, "text": spec["text"], "momentum": None,
                       "queue_size": 0}).eval()


def _timed_captions(model: BLIP, images: torch.Tensor, shape: str, decoding: str, use_cache: bool
                    ) -> tuple[float, torch.Tensor]:
    """Seconds of one ``generate`` over ``images`` and its tokens (``[B, T]``); the seed is fixed so both
    providers draw the same samples."""
    spec = SHAPES[shape]
    torch.manual_seed(1)
    start = time.perf_counter()
    with torch.no_grad():
        ids = model.generate(images, prompt_ids=PROMPT_IDS, max_length=spec["max_length"],
                             min_length=spec["min_length"], use_cache=use_cache, **DECODINGS[decoding])
    return time.perf_counter() - start, ids


def measure(shape: str, decoding: str, repeats: int) -> dict:
    """Captions/s of both providers over ``repeats`` alternating runs (plus one warm-up run each)."""
    model = build_captioner(shape)
    spec = SHAPES[shape]
    image_size = spec["vision"]["image_size"]
    images = torch.randn(spec["batch"], 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    rates: dict[str, list[float]] = {"cached": [], "uncached": []}
    for repeat in range(repeats + 1):
        seconds, tokens = {}, {}
        for name in rates:
            seconds[name], tokens[name] = _timed_captions(model, images, shape, decoding, name == "cached")
        if not torch.equal(tokens["cached"], tokens["uncached"]):
            raise AssertionError(f"{shape}/{decoding}: cached and uncached decoding produced different tokens")
        if repeat > 0:  # the first round warms up allocator and caches
            for name in rates:
                rates[name].append(spec["batch"] / seconds[name])
    row = {"shape": shape, "decoding": decoding, "batch": spec["batch"], "max_length": spec["max_length"],
           "tokens": int(tokens["cached"].shape[1]), "repeats": repeats}
    for name, values in rates.items():
        row[name] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    row["speedup"] = row["cached"]["median"] / row["uncached"]["median"]
    return row


def main(shapes: list[str], decodings: list[str], repeats: int) -> list[dict]:
    """Measure every (shape, decoding) and print one line each; returns the rows."""
    print(f"threads {torch.get_num_threads()}, load average (1 min) before: {os.getloadavg()[0]:.2f}")
    rows = []
    for shape in shapes:
        for decoding in decodings:
            row = measure(shape, decoding, repeats)
            rows.append(row)
            c, u = row["cached"], row["uncached"]
            print(f"{shape:5s} {decoding:8s} batch {row['batch']:3d} tokens {row['tokens']:3d}  captions/s "
                  f"cached {c['median']:8.2f} [{c['min']:.2f}, {c['max']:.2f}]  uncached {u['median']:8.2f} "
                  f"[{u['min']:.2f}, {u['max']:.2f}]  speed-up x{row['speedup']:.2f}", flush=True)
    print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")
    return rows
