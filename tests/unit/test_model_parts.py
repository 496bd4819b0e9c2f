"""Masks, statistics pooling and cross-modal attention, each on its own."""

from __future__ import annotations

import math

import pytest
import torch

from emotrain.config import ModelConfig
from emotrain.model.cross_attention import CrossAttention, CrossModalAttention
from emotrain.model.encoders import build_audio_encoder
from emotrain.model.group_norm import LengthMaskedGroupNorm, install_masked_group_norm
from emotrain.model.masks import (
    audio_frame_mask,
    audio_sample_mask,
    lengths_to_mask,
    text_mask,
)
from emotrain.model.pooling import STD_EPS, masked_mean_std

# ---------------------------------------------------------------------------------------------
# Masks


def test_lengths_to_mask():
    mask = lengths_to_mask(torch.tensor([0, 2, 4]), 4)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[False] * 4, [True, True, False, False], [True] * 4]
    assert audio_sample_mask(torch.tensor([1, 3]), 3).tolist() == [[1, 0, 0], [1, 1, 1]]
    assert text_mask(torch.tensor([[1, 1, 0]])).tolist() == [[True, True, False]]


def test_frame_mask_matches_the_frames_an_unpadded_utterance_gives():
    torch.manual_seed(0)
    encoder = build_audio_encoder(ModelConfig()).eval()
    lengths = torch.tensor([325, 326, 644, 645, 1000, 4321])
    num_samples = int(lengths.max())
    expected = encoder._get_feat_extract_output_lengths(lengths)
    padded_frames = encoder._get_feat_extract_output_lengths(num_samples)
    mask = audio_frame_mask(encoder, lengths, padded_frames)
    assert mask.shape == (len(lengths), padded_frames)
    assert mask.sum(1).tolist() == expected.tolist()
    # ...and those are the frame counts the encoder really produces from each unpadded utterance.
    with torch.no_grad():
        for n, frames in zip(lengths.tolist(), mask.sum(1).tolist()):
            out = encoder(torch.randn(1, n)).last_hidden_state
            assert out.shape[1] == frames
    assert encoder._get_feat_extract_output_lengths(324) == 0  # receptive field: 325 samples


# ---------------------------------------------------------------------------------------------
# Group norm over each utterance's real frames


@pytest.mark.parametrize("groups", [8, 2])  # wav2vec2's (one group per channel), and channels shared
def test_masked_group_norm_is_group_norm_of_each_unpadded_row(groups):
    torch.manual_seed(0)
    reference = torch.nn.GroupNorm(groups, 8)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2.0)
        reference.bias.normal_()
    norm = LengthMaskedGroupNorm(groups, 8)
    norm.load_state_dict(reference.state_dict())
    lengths = [12, 5, 2]
    x = torch.randn(3, 8, 12) * 4 + 3
    x[1, :, 5:] = 1e4  # padding far from the real values: counted, it would swamp the statistics
    x[2, :, 2:] = -1e4
    x.requires_grad_(True)
    norm.valid_frames = torch.tensor(lengths)
    out = norm(x)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(out[row, :, :n], reference(x[row : row + 1, :, :n])[0], atol=1e-5, rtol=1e-5)
    out[:, :, :5].sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1, :, 5:] == 0).all()  # padding gets no gradient
    assert norm.weight.grad is not None and norm.bias.grad is not None
    norm.valid_frames = None  # unset: nn.GroupNorm over all frames
    torch.testing.assert_close(norm(x), reference(x))


def test_masked_group_norm_dtypes_follow_group_norm():
    norm = LengthMaskedGroupNorm(4, 4)
    norm.valid_frames = torch.tensor([3, 6])
    x = torch.randn(2, 4, 6, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x).dtype == torch.float32  # as autocast runs group_norm
    assert norm.to(torch.bfloat16)(x).dtype == torch.bfloat16  # a model cast to bf16 as a whole


def test_install_keeps_the_group_norm_parameters_and_names():
    from transformers import Wav2Vec2Model

    from emotrain.model.encoders import tiny_audio_config

    config = tiny_audio_config(ModelConfig())
    config.feat_extract_norm, config.do_stable_layer_norm = "group", False
    encoder = Wav2Vec2Model(config)
    names = list(encoder.state_dict())
    weight = encoder.feature_extractor.conv_layers[0].layer_norm.weight
    assert install_masked_group_norm(encoder) == 1
    norm = encoder.feature_extractor.conv_layers[0].layer_norm
    assert type(norm) is LengthMaskedGroupNorm and norm.weight is weight
    assert list(encoder.state_dict()) == names
    assert install_masked_group_norm(encoder) == 0  # idempotent
    assert install_masked_group_norm(build_audio_encoder(ModelConfig())) == 0  # layer norm: nothing to do


# ---------------------------------------------------------------------------------------------
# Pooling


def test_pooling_equals_mean_and_std_of_the_unpadded_part():
    torch.manual_seed(0)
    lengths = [5, 1, 8, 3]
    x = torch.randn(4, 8, 6) * 3 + 1
    mask = lengths_to_mask(torch.tensor(lengths), 8)
    x[~mask] = float("nan")  # whatever sits in the padding must not reach the statistics
    x[0, 6] = float("inf")
    pooled = masked_mean_std(x, mask)
    assert pooled.shape == (4, 12)
    for i, n in enumerate(lengths):
        valid = x[i, :n]
        expected_std = valid.std(dim=0, unbiased=False).clamp_min(math.sqrt(STD_EPS))
        torch.testing.assert_close(pooled[i, :6], valid.mean(dim=0))
        torch.testing.assert_close(pooled[i, 6:], expected_std)


def test_pooling_length_one_and_constant_sequences_have_finite_gradients():
    x = torch.zeros(2, 4, 3)
    x[0, 0] = torch.tensor([1.0, 2.0, 3.0])  # length 1
    x[1] = 7.0  # constant: variance 0
    x.requires_grad_(True)
    mask = lengths_to_mask(torch.tensor([1, 4]), 4)
    pooled = masked_mean_std(x, mask)
    torch.testing.assert_close(pooled[0, :3], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(pooled[:, 3:], torch.full((2, 3), math.sqrt(STD_EPS)))
    pooled.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[0, 1:] == 0).all()  # padding gets no gradient


def test_pooling_computes_in_float32():
    x = torch.randn(2, 5, 4).bfloat16()
    pooled = masked_mean_std(x, torch.ones(2, 5, dtype=torch.bool))
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[:, :4], x.float().mean(1))


# ---------------------------------------------------------------------------------------------
# Cross-attention


def test_cross_attention_matches_a_plain_masked_softmax_reference():
    torch.manual_seed(0)
    attn = CrossAttention(hidden_size=8, num_heads=2, dropout=0.0).eval()
    queries, keys = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    key_mask = lengths_to_mask(torch.tensor([5, 2]), 5)
    out = attn(queries, keys, key_mask)
    assert out.shape == (2, 3, 8)

    q = attn.query(queries).view(2, 3, 2, 4).transpose(1, 2)
    k, v = attn.key_value(keys).view(2, 5, 2, 2, 4).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / 2.0  # sqrt(d_h = 4)
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    reference = attn.output((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 3, 8))
    torch.testing.assert_close(out, reference)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_cross_modal_attention_ignores_padded_keys(num_layers):
    torch.manual_seed(0)
    layer = CrossModalAttention(hidden_size=16, num_heads=4, num_layers=num_layers, dropout=0.1).eval()
    audio, text = torch.randn(3, 7, 16), torch.randn(3, 5, 16)
    audio_mask = lengths_to_mask(torch.tensor([7, 4, 1]), 7)
    txt_mask = lengths_to_mask(torch.tensor([2, 5, 3]), 5)
    with torch.no_grad():
        a1, t1 = layer(audio, audio_mask, text, txt_mask)
        assert a1.shape == audio.shape and t1.shape == text.shape
        # Perturb every padded position of both streams (they serve as keys for the other one).
        audio2 = torch.where(audio_mask[..., None], audio, torch.randn_like(audio) * 100)
        text2 = torch.where(txt_mask[..., None], text, torch.randn_like(text) * 100)
        a2, t2 = layer(audio2, audio_mask, text2, txt_mask)
        torch.testing.assert_close(a2[audio_mask], a1[audio_mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t2[txt_mask], t1[txt_mask], atol=1e-5, rtol=1e-5)
        # Control: perturbing a *valid* text token does change the audio stream.
        text3 = text.clone()
        text3[0, 0] += 1.0
        a3, _ = layer(audio, audio_mask, text3, txt_mask)
        assert not torch.allclose(a3[0], a1[0], atol=1e-4)
