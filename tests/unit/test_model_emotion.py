"""EmotionModel behaviour on tiny random encoders: padding, gradients, checkpointing, save/load."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import transformers.modeling_utils

import emotrain.model.encoders as encoders_module
from emotrain.config import ModelConfig
from emotrain.model import (
    EmotionModel,
    EmotionModelOutput,
    build_model,
    build_processors,
)

VARIANTS = ["fusion", "audio", "text"]


def tiny_config(**overrides) -> ModelConfig:
    # The conv stack frozen as for a pretrained encoder (a random tiny one trains whole by default):
    # these tests check what freezing spares.
    fields = dict(hidden_size=16, cross_attention_heads=4, classifier_hidden_size=16, tiny_hidden_size=32,
                  freeze_feature_encoder=True)
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> EmotionModel:
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides))


@pytest.fixture(scope="module")
def tokenizer():
    return build_processors(tiny_config(variant="text"))[1]


def make_batch(tokenizer, audio: list[torch.Tensor], texts: list[str], noisy_padding: bool = True) -> dict:
    """Collate like the data pipeline, but fill the padding with noise (audio) and random token ids
    (text): a model that masks correctly cannot tell."""
    lengths = torch.tensor([len(a) for a in audio])
    if noisy_padding:
        input_values = torch.randn(len(audio), int(lengths.max())) * 5
    else:
        input_values = torch.zeros(len(audio), int(lengths.max()))
    for i, a in enumerate(audio):
        input_values[i, : len(a)] = a
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    if noisy_padding:
        noise = torch.randint(1000, 30000, input_ids.shape)
        input_ids = torch.where(attention_mask.bool(), input_ids, noise)
    return {
        "input_values": input_values,
        "audio_lengths": lengths,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
    }


def random_batch(tokenizer, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    audio = [torch.randn(n, generator=g) for n in (3000, 4800, 1200)]
    texts = ["oh no, not again", "I can't believe you did that to me, really!", "fine"]
    batch = make_batch(tokenizer, audio, texts)
    batch["labels"] = torch.tensor([0, 3, 2])
    return batch


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def group_norm_audio_encoder(tmp_path_factory) -> str:
    """A tiny random Wav2Vec2 folder normalised like wav2vec2-base (the paper's audio encoder):
    group norm over time in the first conv layer, post-norm transformer."""
    from transformers import Wav2Vec2Model

    config = encoders_module.tiny_audio_config(tiny_config())
    config.feat_extract_norm, config.do_stable_layer_norm = "group", False
    folder = tmp_path_factory.mktemp("w2v-group")
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "variant, audio_norm", [(v, "layer") for v in VARIANTS] + [("fusion", "group"), ("audio", "group")]
)
def test_logits_do_not_depend_on_padding(tokenizer, variant, audio_norm, request):
    overrides = {}
    if audio_norm == "group":
        overrides["audio_encoder"] = request.getfixturevalue("group_norm_audio_encoder")
    model = tiny_model(variant=variant, cross_attention_layers=2, **overrides).eval()
    if audio_norm == "group":
        assert model.audio_encoder.config.feat_extract_norm == "group"
    torch.manual_seed(1)
    short_audio, short_text = torch.randn(2100), "why"
    others = [(torch.randn(6400), "this is a much longer sentence than the other one, isn't it"),
              (torch.randn(5000), "and a third, to be sure padding is everywhere")]
    alone = make_batch(tokenizer, [short_audio], [short_text])
    batch = make_batch(
        tokenizer, [others[0][0], short_audio, others[1][0]], [others[0][1], short_text, others[1][1]]
    )
    assert batch["input_values"].shape[1] > 3 * len(short_audio)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]
    with torch.no_grad():
        logits_alone = model(**alone).logits
        logits_batch = model(**batch).logits
    assert logits_batch.shape == (3, 4)
    torch.testing.assert_close(logits_batch[1:2], logits_alone, atol=1e-5, rtol=1e-5)
    # Control: the other utterances give different logits (the comparison above is not trivial).
    assert not torch.allclose(logits_batch[0], logits_batch[1], atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_unimodal_variants_build_and_need_only_their_modality(tokenizer, variant):
    model = tiny_model(variant=variant)
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("audio_encoder.") for n in names) == (variant != "text")
    assert any(n.startswith("text_encoder.") for n in names) == (variant != "audio")
    assert (model.audio_encoder is None) == (variant == "text")
    assert (model.text_encoder is None) == (variant == "audio")
    batch = random_batch(tokenizer)
    if variant == "audio":
        batch["input_ids"] = batch["attention_mask"] = None
    elif variant == "text":
        batch["input_values"] = batch["audio_lengths"] = None
    out = model(**batch)
    assert isinstance(out, EmotionModelOutput)
    assert out.logits.shape == (3, 4)
    expected = torch.nn.functional.cross_entropy(out.logits, batch["labels"])
    torch.testing.assert_close(out.loss, expected)
    assert model(**{**batch, "labels": None}).loss is None


def test_fusion_needs_both_modalities_and_rejects_too_short_audio(tokenizer):
    model = tiny_model().eval()
    batch = random_batch(tokenizer)
    with pytest.raises(ValueError, match="input_ids"):
        model(**{**batch, "input_ids": None})
    with pytest.raises(ValueError, match="input_values"):
        model(**{**batch, "input_values": None})
    short = {**batch, "audio_lengths": torch.tensor([3000, 200, 1200])}
    with pytest.raises(RuntimeError, match="shorter than one frame"):  # an asynchronous device assert
        model(**short)
    no_tokens = {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}
    with pytest.raises(RuntimeError, match="at least one token"):
        model(**no_tokens)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_trainable_parameter_and_spare_the_frozen_conv_stack(tokenizer, variant):
    model = tiny_model(variant=variant).train()
    model(**random_batch(tokenizer)).loss.backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if variant != "text":
        assert frozen and all(n.startswith("audio_encoder.feature_extractor.") for n in frozen)
        conv = dict(model.named_parameters())["audio_encoder.feature_extractor.conv_layers.0.conv.weight"]
        assert not conv.requires_grad
    else:
        assert frozen == []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
        else:
            # Every trainable parameter is used (DDP without find_unused_parameters needs that).
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
    groups = {"audio_encoder.": 0.0, "text_encoder.": 0.0, "head": 0.0}
    for name, p in model.named_parameters():
        if p.grad is not None:
            key = next((k for k in ("audio_encoder.", "text_encoder.") if name.startswith(k)), "head")
            groups[key] += float(p.grad.abs().sum())
    assert groups["head"] > 0
    assert (groups["audio_encoder."] > 0) == (variant != "text")
    assert (groups["text_encoder."] > 0) == (variant != "audio")


def test_unfrozen_feature_encoder_gets_gradients(tokenizer):
    model = tiny_model(freeze_feature_encoder=False).train()
    model(**random_batch(tokenizer)).loss.backward()
    conv = dict(model.named_parameters())["audio_encoder.feature_extractor.conv_layers.0.conv.weight"]
    assert conv.grad is not None and conv.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tokenizer, monkeypatch):
    calls = []
    original = transformers.modeling_utils.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    model = tiny_model(dropout=0.0).train()  # train mode: transformers checkpoints only in training
    batch = random_batch(tokenizer)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_plain, grads_plain = loss_and_grads()
    assert calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated transformers API on the way
        model.set_gradient_checkpointing(True)
    assert model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads()
    # Each transformer layer of both encoders ran under (non-reentrant) checkpointing.
    assert len(calls) == 2 * model.config.tiny_layers and set(calls) == {False}
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-6, rtol=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=1e-5, msg=name)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.set_gradient_checkpointing(False)
    assert not model.is_gradient_checkpointing
    calls.clear()
    loss_and_grads()
    assert calls == []


def test_input_values_are_cast_to_the_encoder_dtype(tokenizer):
    model = tiny_model().eval().to(torch.bfloat16)  # e.g. DeepSpeed bf16: no autocast, bf16 weights
    batch = random_batch(tokenizer)
    assert batch["input_values"].dtype == torch.float32
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.logits.float()).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_load_round_trip_offline(tokenizer, variant, tmp_path, monkeypatch):
    model = tiny_model(seed=3, variant=variant).eval()
    batch = random_batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    files = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert "model.safetensors" in files and "emotion_model.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for f in files)
    assert ("tokenizer.json" in files) == (variant != "audio")
    assert ("preprocessor_config.json" in files) == (variant != "text")

    # Offline, without the sources the model was built from, and without unpickling anything.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_source(name):
        raise AssertionError(f"loading touched the model source {name!r}")

    def no_pickle(*args, **kwargs):
        raise AssertionError("loading unpickled something")

    monkeypatch.setattr(encoders_module, "resolve_pretrained", no_source)
    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)

    torch.manual_seed(123)  # a different random init, overwritten by the loaded weights
    loaded = EmotionModel.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=0, rtol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # The loaded model is set up for fine-tuning the same way.
    if variant != "text":
        assert not any(p.requires_grad for p in loaded.audio_encoder.feature_extractor.parameters())
    feature_extractor, loaded_tokenizer = loaded.processors()
    if variant != "audio":
        text = "I really can't stand this"
        assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    else:
        assert loaded_tokenizer is None
    if variant != "text":
        assert feature_extractor.sampling_rate == 16000 and feature_extractor.return_attention_mask
    else:
        assert feature_extractor is None


def test_save_with_an_explicit_state_dict(tokenizer, tmp_path):
    """The ZeRO-3 path: the caller passes the gathered weights (here: this model's, as views)."""
    model = tiny_model(seed=4).eval()
    state = {k: v.detach().view(-1).view(v.shape) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "saved", state_dict=state)
    loaded = EmotionModel.from_pretrained(tmp_path / "saved").eval()
    batch = random_batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_prepared_text_mask_gives_what_the_2d_mask_gives(tokenizer, implementation):
    """The text encoder gets a prepared 4D mask (transformers would otherwise read the 2D one on the
    host to see whether it holds padding: a device sync per forward); the tokens must not change."""
    from emotrain.model.modeling_emotrain import encoder_attention_mask

    model = tiny_model(variant="text").eval()
    encoder = model.text_encoder
    encoder.config._attn_implementation = implementation
    batch = tokenizer(["a much longer sentence than the other one", "hi"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0  # a padded row
    prepared = encoder_attention_mask(encoder, batch["attention_mask"])
    assert prepared.dim() == 4
    with torch.no_grad():
        expected = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = encoder(input_ids=batch["input_ids"], attention_mask=prepared).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5)


def test_checkpointing_per_encoder_and_the_attention_kernels_are_chosen_by_config():
    from emotrain.model import build_model

    model = build_model(ModelConfig(variant="fusion", text_encoder="tiny", attention="eager")).train()
    assert model.audio_encoder.config._attn_implementation == "eager"
    assert model.text_encoder.config._attn_implementation == "eager"

    def checkpointed(encoder):
        return any(getattr(m, "gradient_checkpointing", False) for m in encoder.modules())

    for choice, audio, text in (("audio", True, False), ("text", False, True), (True, True, True), (False, False, False)):
        model.set_gradient_checkpointing(choice)
        assert (checkpointed(model.audio_encoder), checkpointed(model.text_encoder)) == (audio, text), choice


def test_encoders_outside_the_allowlist_keep_their_2d_mask():
    from transformers import DebertaV2Config, DebertaV2Model

    from emotrain.model.modeling_emotrain import encoder_attention_mask

    deberta = DebertaV2Model(DebertaV2Config(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert encoder_attention_mask(deberta, mask) is mask  # DeBERTa builds its own mask: a 4D one gave NaN
