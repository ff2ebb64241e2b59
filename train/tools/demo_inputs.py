"""The demo's inputs, made on first use: the shapes data set (``data.shapes``) and a word tokenizer
trained on its captions (``tokenizer.train_from_shapes``).

:func:`prepare_demo_inputs` is the setup hook ``vlmcore-train`` / ``vlmcore.train.main`` hand to the
Trainer: it runs after the process group is up, rank 0 writes what is missing while the other
ranks wait at the barrier, then every rank checks and reads the same files.
"""

from __future__ import annotations

import os

from vlmcore.train.config import TrainConfig
from vlmcore.train.data.tokenizer import train_word_tokenizer
from vlmcore.train.runtime import distributed
from vlmcore.train.tools import shapes


def prepare_demo_inputs(cfg: TrainConfig, info: distributed.DistInfo) -> None:
    """Generate the shapes data and train the tokenizer if asked and missing (rank 0), then a barrier."""
    if info.is_main:
        s = cfg.data.shapes
        if s is not None and not shapes.is_complete(s.dir):
            shapes.make_shapes(s.dir, s.n_train, s.n_eval, s.n_docs, s.image_size, s.shard_size, s.seed)
        t = cfg.tokenizer
        if t.train_from_shapes and not os.path.exists(t.path):
            if s is None:
                raise ValueError("tokenizer.train_from_shapes needs data.shapes")
            train_word_tokenizer(os.path.join(s.dir, "captions.txt"), t.path)
    distributed.barrier()
