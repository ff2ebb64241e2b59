"""One gloo rank for tests/models/test_blip2_stage1.py (run as a script, not collected by pytest).

Usage: ``python blip2_dist_worker.py RANK WORLD INIT_FILE OUT_FILE``

Every rank builds the same tiny :class:`Blip2Stage1` and global batch (:func:`build`, fixed seeds),
keeps its slice of the batch, and for each case of :data:`CASES` runs forward + backward with
``group=WORLD`` and a hard-negative generator of seed :data:`NEG_SEED`. Saves per case the loss
dict, the chosen negatives (as the images' and texts' global positions recovered from the
exchanged rows) and every parameter gradient (CPU tensors) with ``torch.save``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

N_LOCAL, WIDTH, TOKENS, LENGTH, VOCAB, NEG_SEED = 3, 16, 5, 6, 40, 77
CASES = [("lavis", False, False), ("with_grad", True, False), ("image_ids", False, True)]


def build(world: int, gather_with_grad: bool, group=None):
    """``(model, image_embeds [N, S, W], text_ids [N, L], image_ids [N])``, identical on every rank."""
    from vlmcore.blip2 import Blip2Stage1, QFormer

    torch.manual_seed(0)
    qformer = QFormer(WIDTH, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48, num_query_tokens=4,
                      vocab_size=VOCAB, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0)
    model = Blip2Stage1(qformer, embed_dim=8, dec_token_id=VOCAB - 1, group=group, gather_with_grad=gather_with_grad)
    gen = torch.Generator().manual_seed(1234)
    total = world * N_LOCAL
    image = torch.randn(total, TOKENS, WIDTH, generator=gen)
    text = torch.randint(1, VOCAB - 1, (total, LENGTH), generator=gen)
    image_ids = torch.arange(total) // 2  # pairs of captions of one image (a pair spans the two ranks)
    return model, image, text, image_ids


def run(model, image, text, image_ids, use_ids: bool) -> dict:
    """Forward + backward; the loss dict, the negatives' rows and the gradients."""
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(NEG_SEED)
    captured = {}
    import vlmcore.blip2.stage1 as blip2

    real_fetch = blip2.fetch_rows

    def spy(local, index, group):
        out = real_fetch(local, index, group)
        captured.setdefault("fetched", []).append(out)
        return out

    blip2.fetch_rows = spy
    try:
        out = model(text_ids=text, image_embeds=image, image_ids=image_ids if use_ids else None, generator=gen)
    finally:
        blip2.fetch_rows = real_fetch
    out["loss"].backward()
    result = {k: v.detach() for k, v in out.items()}
    result["negative_images"] = captured["fetched"][0]
    result["negative_texts"] = captured["fetched"][1]
    result["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return result


def main(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    results = {}
    for name, with_grad, use_ids in CASES:
        model, image, text, image_ids = build(world, with_grad, group=dist.group.WORLD)
        results[name] = run(model, image[rows], text[rows], image_ids[rows], use_ids)
    torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
