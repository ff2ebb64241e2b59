"""Flamingo on video clips: the resampler's time embeddings against OpenFlamingo's own
``PerceiverResampler(max_num_frames=...)`` (open-flamingo 2.0.1, installed ``--no-deps``), the frame
mask of short clips, and ``vlmcore.Flamingo(max_num_frames=...)`` end to end."""

import importlib.util
import os
import sys
import types

import pytest
import torch
from helpers.numerics import assert_close
from helpers.tiny_lm import MEDIA, VOCAB, tiny_lm

import vlmcore

DIM, FRAMES, TOKENS = 24, 4, 5


@pytest.fixture(scope="module")
def openflamingo_helpers():
    """``open_flamingo/src/helpers.py`` loaded by path (its package ``__init__`` pulls in open_clip with
    torchvision). It imports ``einops_exts.rearrange_many``, which is not installed: the stand-in is
    that function's whole definition (einops_exts 0.0.4), over the real einops."""
    spec = importlib.util.find_spec("open_flamingo")
    einops = pytest.importorskip("einops")
    if spec is None:
        pytest.skip("open_flamingo is not installed (pip install --no-deps open-flamingo==2.0.1)")
    path = os.path.join(os.path.dirname(spec.origin), "src", "helpers.py")
    exts = types.ModuleType("einops_exts")
    exts.rearrange_many = lambda tensors, pattern, **kw: [einops.rearrange(t, pattern, **kw) for t in tensors]
    saved = sys.modules.get("einops_exts")
    sys.modules["einops_exts"] = exts
    try:
        module_spec = importlib.util.spec_from_file_location("openflamingo_helpers", path)
        helpers = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(helpers)
    finally:
        if saved is None:
            sys.modules.pop("einops_exts")
        else:
            sys.modules["einops_exts"] = saved
    return helpers


def _resampler_pair(helpers):
    torch.manual_seed(0)
    sizes = dict(dim=DIM, depth=2, dim_head=8, heads=3, num_latents=5, max_num_frames=FRAMES, ff_mult=2)
    ref = helpers.PerceiverResampler(**sizes)
    ours = vlmcore.PerceiverResampler(**sizes)
    ours.load_state_dict(ref.state_dict(), strict=True)  # the same names: OpenFlamingo weights load as they are
    return ours, ref


def test_resampler_time_embeddings_match_openflamingo(openflamingo_helpers):
    ours, ref = _resampler_pair(openflamingo_helpers)
    x = torch.randn(2, 1, FRAMES, TOKENS, DIM)
    with torch.no_grad():
        got, expected = ours(x), ref(x)
        shuffled = ours(x[:, :, [2, 0, 3, 1]])
    assert_close(got, expected, name="clip of 4 frames", atol=5e-5)
    # Time embeddings active: the same frames in another order give other latents.
    assert (shuffled - got).abs().max() > 1e-2


def test_resampler_frame_mask_equals_openflamingo_on_the_real_frames(openflamingo_helpers):
    """OpenFlamingo has no mask: a clip of 2 real frames padded to 4 with our mask gives what
    OpenFlamingo gives on the 2 real frames alone (padding tokens are not attended)."""
    ours, ref = _resampler_pair(openflamingo_helpers)
    x = torch.randn(1, 1, FRAMES, TOKENS, DIM)
    x[:, :, 2:] = 0.0  # zero padding frames, as the video decoder writes them
    frame_mask = torch.tensor([[[True, True, False, False]]])
    with torch.no_grad():
        masked = ours(x, media_mask=frame_mask.repeat_interleave(TOKENS, dim=2))
        expected = ref(x[:, :, :2])
        unmasked = ours(x)
    assert_close(masked, expected, name="masked padding", atol=5e-5)
    assert (unmasked - masked).abs().max() > 1e-3  # without the mask the padding does change the latents


def _tiny_flamingo(max_num_frames):
    torch.manual_seed(0)
    vision = vlmcore.VisionTransformer(8, 4, 16, 1, 2)
    model = vlmcore.Flamingo(vision, tiny_lm("llama"), media_token_id=MEDIA, vis_dim=16, num_latents=3,
                             resampler_depth=1, dim_head=8, heads=2, ff_mult=2, max_num_frames=max_num_frames)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:  # open the gates: the media reach the logits
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model.eval()


def _clip_batch():
    lang_x = torch.randint(4, VOCAB, (2, 9))
    lang_x[:, 0] = MEDIA
    return torch.randn(2, 1, FRAMES, 3, 8, 8), lang_x


def test_flamingo_video_builds_time_embeddings_and_reads_frame_order():
    model = _tiny_flamingo(FRAMES)
    assert model.perceiver.frame_embs.shape == (FRAMES, 16)
    assert "perceiver.frame_embs" in model.trainable_state_dict()
    assert _tiny_flamingo(None).perceiver.frame_embs is None  # images only, as before
    vision_x, lang_x = _clip_batch()
    with torch.no_grad():
        ordered = model(vision_x, lang_x).logits
        shuffled = model(vision_x[:, :, [3, 1, 0, 2]], lang_x).logits
    assert (ordered - shuffled).abs().max() > 1e-4


def test_flamingo_frame_mask_hides_padding_frames():
    model = _tiny_flamingo(FRAMES)
    vision_x, lang_x = _clip_batch()
    frame_mask = torch.tensor([[True, True, True, False], [True, False, False, False]])[:, None]  # [B, 1, F]
    other_padding = vision_x.clone()
    other_padding[0, 0, 3] = torch.randn(3, 8, 8)
    other_padding[1, 0, 1:] = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        masked = model(vision_x, lang_x, frame_mask=frame_mask).logits
        repadded = model(other_padding, lang_x, frame_mask=frame_mask).logits
        unmasked = model(other_padding, lang_x).logits
        short = model(vision_x[1:, :, :1], lang_x[1:]).logits  # sample 1 as a 1-frame clip
    assert_close(repadded, masked, name="padding content under the mask", atol=1e-5)
    assert (unmasked - masked).abs().max() > 1e-4
    assert_close(masked[1:], short, name="1 real frame of 4 vs a 1-frame clip", atol=1e-5)


def test_flamingo_generate_takes_the_frame_mask():
    model = _tiny_flamingo(FRAMES)
    vision_x, lang_x = _clip_batch()
    frame_mask = torch.zeros(2, 1, FRAMES, dtype=torch.bool)
    frame_mask[..., 0] = True
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    masked = model.generate(vision_x, lang_x, frame_mask=frame_mask, **kwargs)
    first_frame = model.generate(vision_x[:, :, :1], lang_x, **kwargs)
    assert torch.equal(masked.sequences, first_frame.sequences)
    assert_close(torch.stack(masked.scores), torch.stack(first_frame.scores), name="scores", atol=1e-5)


def test_flamingo_rejects_a_bad_frame_mask():
    model = _tiny_flamingo(FRAMES)
    vision_x, lang_x = _clip_batch()
    with pytest.raises(ValueError, match="frame_mask must be bool"):
        model(vision_x, lang_x, frame_mask=torch.ones(2, 1, FRAMES - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="frame_mask must be bool"):
        model(vision_x, lang_x, frame_mask=torch.ones(2, 1, FRAMES))
    with pytest.raises(ValueError, match="max_num_frames"):
        _tiny_flamingo(2)(vision_x, lang_x)
