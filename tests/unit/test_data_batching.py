"""Batch planning (shuffle buffer, duration buckets, fixed size), decoding helpers and the collate step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emotrain.data.audio import (
    AudioDecodeError,
    crop_offset,
    cropped_seconds,
    decode_audio,
)
from emotrain.data.batching import (
    TENSOR_KEYS,
    Collator,
    bucket_batches,
    cut_sorted,
    fixed_batches,
    ladder_length,
    ladder_seconds,
    padding_efficiency,
    plan_padding_efficiency,
    shuffle_buffer_order,
)
from tests.toyset import (
    encode_audio,
    iemocap_like_durations,
    tone,
    toy_processors,
)


@pytest.fixture(scope="module")
def processors():
    return toy_processors()


def test_iemocap_like_durations_match_the_corpus_shape():
    d = iemocap_like_durations(5531, np.random.default_rng(0))
    assert 4.2 < d.mean() < 4.9 and 3.3 < np.median(d) < 3.9
    assert 10.0 < np.percentile(d, 95) < 12.5
    assert d.min() >= 0.59 and d.max() <= 34.14


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucketing_reaches_90_percent_padding_efficiency_on_iemocap_durations(seed):
    rng = np.random.default_rng(seed)
    seconds = cropped_seconds(iemocap_like_durations(4400, rng), 15.0)  # a fold's training set
    items = np.arange(len(seconds))
    order = shuffle_buffer_order(items, 512, rng)
    bucketed = bucket_batches(
        order, seconds[order], buffer_size=256, max_batch_seconds=80.0, max_batch_size=8, rng=rng
    )
    fixed = fixed_batches(order, 8)
    eff_bucket = plan_padding_efficiency(bucketed, seconds)
    eff_fixed = plan_padding_efficiency(fixed, seconds)
    assert eff_bucket >= 0.90, eff_bucket
    assert eff_fixed < 0.75 < eff_bucket  # fixed-size random batches pad a lot (about 0.55)
    for batches in (bucketed, fixed):
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == items.tolist()  # every utterance exactly once
    for b in bucketed:
        assert len(b) <= 8 and (len(b) == 1 or len(b) * seconds[b].max() <= 80.0)


def test_budget_only_bucketing_respects_the_padded_seconds_budget():
    rng = np.random.default_rng(3)
    seconds = cropped_seconds(iemocap_like_durations(2000, rng), 15.0)
    batches = bucket_batches(
        np.arange(2000), seconds, buffer_size=256, max_batch_seconds=60.0, max_batch_size=None, rng=rng
    )
    assert all(len(b) * seconds[b].max() <= 60.0 for b in batches)
    assert plan_padding_efficiency(batches, seconds) >= 0.9
    assert np.mean([len(b) for b in batches]) > 8  # short utterances make big batches


def test_cut_sorted_rules():
    s = np.array([1.0, 1.0, 2.0, 2.0, 2.0, 9.0, 20.0])
    cuts = cut_sorted(s, max_batch_seconds=6.0, max_batch_size=None)
    assert [c.tolist() for c in cuts] == [[0, 1, 2], [3, 4], [5], [6]]  # 20 s > budget: alone
    cuts = cut_sorted(s, max_batch_seconds=None, max_batch_size=3)
    assert [len(c) for c in cuts] == [3, 3, 1]
    assert cut_sorted(np.zeros(0), 5.0, 2) == []


def test_shuffle_buffer_is_a_seeded_permutation():
    items = np.arange(100)
    a = shuffle_buffer_order(items, 10, np.random.default_rng(1))
    b = shuffle_buffer_order(items, 10, np.random.default_rng(1))
    c = shuffle_buffer_order(items, 10, np.random.default_rng(2))
    assert sorted(a.tolist()) == items.tolist()
    assert (a == b).all() and not (a == c).all() and not (a == items).all()
    assert (shuffle_buffer_order(items, 0, np.random.default_rng(1)) == items).all()
    # A buffer of 10 cannot emit item 50 before reading it: nothing moves earlier than ~buffer size.
    assert all(pos >= item - 10 for pos, item in enumerate(a.tolist()))


def test_decode_resamples_downmixes_and_rejects_garbage():
    stereo_8k = encode_audio(tone(0.5, 8000, channels=2), 8000, "WAV")
    out = decode_audio(stereo_8k, 16000)
    assert out.dtype == np.float32 and out.ndim == 1 and abs(len(out) - 8000) <= 2
    flac = decode_audio(encode_audio(tone(0.25, 16000), 16000, "FLAC"), 16000)
    assert len(flac) == 4000
    for bad in (b"", None, b"RIFF\x00\x00garbage"):
        with pytest.raises(AudioDecodeError):
            decode_audio(bad, 16000)


def test_crop_offset_is_a_pure_function_of_seed_epoch_id():
    a = crop_offset(50_000, 16_000, random=True, seed=1, epoch=0, utt_id="x")
    assert a == crop_offset(50_000, 16_000, random=True, seed=1, epoch=0, utt_id="x")
    offsets = {crop_offset(50_000, 16_000, random=True, seed=1, epoch=e, utt_id="x") for e in range(10)}
    assert len(offsets) > 1 and all(0 <= o <= 34_000 for o in offsets)
    assert crop_offset(50_000, 16_000, random=False, seed=1, epoch=0, utt_id="x") == 0
    assert crop_offset(10_000, 16_000, random=True, seed=1, epoch=0, utt_id="x") == 0


def test_collator_builds_the_batch_contract(processors):
    fe, tok = processors
    rng = np.random.default_rng(0)
    arrays = [rng.normal(3.0, 2.0, n).astype(np.float32) for n in (1600, 4000, 2500)]
    texts = ["hello there", "this is a much longer sentence that will be truncated for sure", ""]
    examples = [{"id": f"u{i}", "array": a, "text": t, "label": i} for i, (a, t) in enumerate(zip(arrays, texts))]
    batch = Collator(fe, tok, max_text_tokens=8)(examples)
    assert batch["input_values"].dtype == torch.float32 and batch["input_values"].shape == (3, 4000)
    assert batch["audio_lengths"].tolist() == [1600, 4000, 2500]
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[1] <= 8
    assert batch["attention_mask"].dtype == torch.long and batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["labels"].tolist() == [0, 1, 2]
    assert batch["ids"] == ["u0", "u1", "u2"]
    assert set(TENSOR_KEYS) <= set(batch)
    assert (batch["input_ids"] != tok.unk_token_id).all(), "real WordPiece ids, not [UNK]"
    # Each utterance normalised over its own samples; padding stays exactly zero.
    for row, n in zip(batch["input_values"], batch["audio_lengths"].tolist()):
        valid = row[:n]
        assert abs(valid.mean().item()) < 1e-3 and abs(valid.std().item() - 1.0) < 1e-2
        assert (row[n:] == 0).all()
    assert batch["audio_seconds"] == pytest.approx(8100 / 16000)
    assert batch["padded_audio_seconds"] == pytest.approx(3 * 4000 / 16000)
    assert padding_efficiency(batch) == pytest.approx(8100 / 12000)
    assert Collator(fe, tok, 8)([]) is None


def test_collator_normalises_without_padding_leak_even_if_the_extractor_returns_no_mask(processors):
    # A group-norm checkpoint's preprocessor config says return_attention_mask=False: the extractor
    # would then normalise padding too. The collator always asks for the mask.
    from transformers import Wav2Vec2FeatureExtractor

    _, tok = processors
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False)
    examples = [{"id": "a", "array": np.full(100, 5.0, np.float32) + np.arange(100, dtype=np.float32), "text": "a", "label": 0},
                {"id": "b", "array": np.arange(40, dtype=np.float32), "text": "b", "label": 1}]
    batch = Collator(fe, tok, 8)(examples)
    assert (batch["input_values"][1, 40:] == 0).all()
    assert abs(batch["input_values"][1, :40].mean().item()) < 1e-4


@pytest.mark.parametrize("do_normalize", [True, False])
def test_the_numpy_normalisation_is_the_feature_extractor_s_bit_for_bit(processors, do_normalize):
    from transformers import Wav2Vec2FeatureExtractor

    _, tok = processors
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=do_normalize,
                                  return_attention_mask=True)
    rng = np.random.default_rng(1)
    arrays = [rng.normal(0.1, 0.3, n).astype(np.float32) for n in (16000, 3217, 40001, 5)]
    examples = [{"id": str(i), "array": a, "text": "x", "label": 0} for i, a in enumerate(arrays)]
    expected = fe(arrays, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt")
    got = Collator(fe, tok, 8)(examples)["input_values"]
    assert got.dtype == torch.float32 and torch.equal(got, expected["input_values"].to(torch.float32))


@pytest.mark.parametrize("rungs", [1, 2, 4, 8])
def test_the_length_ladder_pads_up_to_few_sizes_at_a_bounded_cost(rungs):
    lengths = range(1, 240_001, 97)
    padded = [ladder_length(n, 320, rungs) for n in lengths]
    assert all(p >= n and p % 320 == 0 for n, p in zip(lengths, padded))
    assert all(ladder_length(p, 320, rungs) == p for p in set(padded))  # a rung pads to itself
    assert padded == sorted(padded)
    # At most one rung's step of extra padding (plus the quantum for the shortest).
    assert all(p <= n * 2 ** (1 / rungs) + 320 for n, p in zip(lengths, padded))
    assert len(set(padded)) <= rungs * 20  # 0.02 s .. 15 s: under 10 octaves
    capped = {ladder_length(n, 320, rungs, cap=240_000) for n in lengths}
    assert max(capped) == 240_000  # the crop is the top rung
    assert ladder_length(1234, 320, 0) == 1234  # off: the batch's longest


def test_a_laddered_batch_is_padded_to_a_rung_and_the_plan_counts_it(processors):
    fe, tok = processors
    rate = 16000
    examples = [{"id": f"u{i}", "array": tone(s, rate), "text": "a b c " * i, "label": i % 4}
                for i, s in enumerate([0.7, 1.3, 2.9])]
    plain = Collator(fe, tok, max_text_tokens=32, sampling_rate=rate)(examples)
    laddered = Collator(fe, tok, max_text_tokens=32, sampling_rate=rate, length_ladder=4)(examples)
    T, L = laddered["input_values"].shape[1], laddered["input_ids"].shape[1]
    assert T == ladder_length(plain["input_values"].shape[1], 320, 4) > plain["input_values"].shape[1]
    assert L == ladder_length(plain["input_ids"].shape[1], 8, 4, 32) and L % 8 == 0
    assert torch.equal(laddered["audio_lengths"], plain["audio_lengths"])
    assert torch.equal(laddered["input_values"][:, : plain["input_values"].shape[1]], plain["input_values"])
    assert not laddered["input_values"][:, plain["input_values"].shape[1]:].any()  # zero padding
    assert torch.equal(laddered["input_ids"][:, : plain["input_ids"].shape[1]], plain["input_ids"])
    assert not laddered["attention_mask"][:, plain["input_ids"].shape[1]:].any()  # the extra tokens are masked
    assert laddered["padded_audio_seconds"] == pytest.approx(3 * T / rate)
    # The plan's durations are what the batches pad to: a budget of padded seconds holds.
    seconds = ladder_seconds(np.array([0.7, 1.3, 2.9]), 4, rate)
    assert seconds[2] == pytest.approx(T / rate)
    d = iemocap_like_durations(2000, np.random.default_rng(1))
    padded_to = ladder_seconds(np.minimum(d, 15.0), 4, rate, cap_seconds=15.0)
    for b in bucket_batches(np.arange(len(d)), padded_to, buffer_size=256, max_batch_seconds=80.0,
                            max_batch_size=8, rng=np.random.default_rng(0)):
        assert len(b) * padded_to[b].max() <= 80.0 + 1e-9
