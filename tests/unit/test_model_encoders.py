"""Encoders and processors: tiny, bundled real weights, local folders (hub-name style), group norm."""

from __future__ import annotations

import copy

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, Wav2Vec2Model

import emotrain.model.modeling_emotrain as em  # the layers and forward (pooling is looked up there)
from emotrain.config import ConfigError, DataConfig, ModelConfig
from emotrain.model import EmotionModel, build_model, build_processors
from emotrain.model.encoders import (
    build_tokenizer,
    check_data_fits_model,
    default_feature_extractor,
    resolve_pretrained,
    tiny_audio_config,
)

MINILM = "bundled:all-MiniLM-L6-v2"


def small(**overrides) -> ModelConfig:
    fields = dict(hidden_size=16, cross_attention_heads=4, classifier_hidden_size=16)
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may need the hub."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_tiny_tokenizer_is_a_real_wordpiece_vocabulary():
    tokenizer = build_tokenizer(small())
    assert len(tokenizer) == 30522
    ids = tokenizer("I am so happy, not angry!")["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "[CLS]", "i", "am", "so", "happy", ",", "not", "angry", "!", "[SEP]",
    ]
    model = build_model(small(variant="text"))
    assert model.text_encoder.config.vocab_size == 30522
    assert model.text_encoder.config.num_hidden_layers == 2 and model.text_encoder.config.hidden_size == 32


def test_processors_for_tiny_encoders():
    feature_extractor, tokenizer = build_processors(small())
    assert feature_extractor.sampling_rate == 16000
    assert feature_extractor.do_normalize and feature_extractor.return_attention_mask  # layer norm
    assert tokenizer is not None
    assert build_processors(small(variant="audio"))[1] is None
    assert build_processors(small(variant="text"))[0] is None


def test_resolve_pretrained():
    assert Path(resolve_pretrained(MINILM), "model.safetensors").is_file()
    assert resolve_pretrained("facebook/wav2vec2-base") == "facebook/wav2vec2-base"
    with pytest.raises(ValueError, match="unknown bundled model"):
        resolve_pretrained("bundled:nope")


def test_bundled_minilm_loads_its_real_weights_and_runs():
    torch.manual_seed(0)
    model = build_model(small(variant="text", text_encoder=MINILM)).eval()
    encoder = model.text_encoder
    assert encoder.config.num_hidden_layers == 6 and encoder.config.hidden_size == 384
    assert encoder.pooler is None  # unused: would get no gradient under DDP
    assert next(encoder.parameters()).dtype == torch.float32
    saved = load_file(Path(resolve_pretrained(MINILM), "model.safetensors"))
    state = encoder.state_dict()
    assert set(state) <= set(saved) and len(state) > 90
    for name, tensor in state.items():
        assert torch.equal(tensor, saved[name]), name

    _, tokenizer = build_processors(model.config)
    texts = ["I am so happy today", "I feel really glad and cheerful", "The train leaves at noon"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
        labels = torch.tensor([1, 1, 0])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    assert out.logits.shape == (3, 4) and torch.isfinite(out.loss)
    # Pretrained, not random: paraphrases are closer than unrelated sentences (mean pooling).
    m = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def test_fusion_model_with_bundled_text_encoder():
    model = build_model(small(text_encoder=MINILM)).train()
    feature_extractor, tokenizer = build_processors(model.config)
    text = tokenizer(["what a day", "no"], padding=True, return_tensors="pt")
    audio = feature_extractor([torch.randn(3200).numpy(), torch.randn(2000).numpy()], sampling_rate=16000,
                              padding=True, return_tensors="pt")
    out = model(audio["input_values"], torch.tensor([3200, 2000]), text["input_ids"], text["attention_mask"],
                torch.tensor([0, 2]))
    out.loss.backward()
    assert model.text_encoder.embeddings.word_embeddings.weight.grad is not None


def _save_tiny_encoder_folders(root: Path, layerdrop: float = 0.1) -> tuple[Path, Path]:
    """Folders like a hub download: weights + config + processor, for a tiny Wav2Vec2 and BERT."""
    torch.manual_seed(5)
    audio_config = tiny_audio_config(small())
    audio_config.layerdrop = layerdrop
    audio_dir, text_dir = root / "w2v", root / "bert"
    Wav2Vec2Model(audio_config).save_pretrained(audio_dir)
    default_feature_extractor(layer_norm=True).save_pretrained(audio_dir)
    BertModel(BertConfig(vocab_size=30522, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48)).save_pretrained(text_dir)
    build_tokenizer(small()).save_pretrained(text_dir)
    return audio_dir, text_dir


def test_encoders_from_local_folders_and_a_round_trip_without_them(tmp_path):
    audio_dir, text_dir = _save_tiny_encoder_folders(tmp_path / "src")
    cfg = small(audio_encoder=str(audio_dir), text_encoder=str(text_dir))
    model = build_model(cfg).eval()
    assert model.audio_encoder.config.layerdrop == 0.0  # overridden for fine-tuning
    assert not any(p.requires_grad for p in model.audio_encoder.feature_extractor.parameters())
    for sub, folder in ((model.audio_encoder, audio_dir), (model.text_encoder, text_dir)):
        saved = load_file(folder / "model.safetensors")
        for name, tensor in sub.state_dict().items():
            assert torch.equal(tensor, saved[name]), name
    assert model.text_encoder.config.hidden_size == 24  # its own size, projected to d

    feature_extractor, tokenizer = build_processors(cfg)
    assert feature_extractor.return_attention_mask and len(tokenizer) == 30522
    torch.manual_seed(0)
    audio = [torch.randn(2500), torch.randn(4000)]
    values = torch.zeros(2, 4000)
    values[0, :2500], values[1] = audio
    text = tokenizer(["hello", "hello there my friend"], padding=True, return_tensors="pt")
    batch = dict(input_values=values, audio_lengths=torch.tensor([2500, 4000]),
                 input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    with torch.no_grad():
        expected = model(**batch).logits

    model.save_pretrained(tmp_path / "model")
    shutil.rmtree(tmp_path / "src")  # the sources are gone: loading needs only the saved folder
    loaded = EmotionModel.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=0, rtol=0)
    assert loaded.config.audio_encoder == str(audio_dir)  # recorded, not needed


def save_group_norm_wav2vec2(folder: Path) -> Path:
    """A random tiny Wav2Vec2 shaped like wav2vec2-base's normalisation: group norm over time in its
    first conv layer, post-norm transformer (`do_stable_layer_norm=False`); no preprocessor config."""
    config = tiny_audio_config(small())
    config.feat_extract_norm, config.do_stable_layer_norm = "group", False
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(folder)
    return folder


def test_group_norm_encoder_is_padding_invariant(tmp_path, monkeypatch):
    """wav2vec2-base's case: an utterance padded next to one three times longer (noise in the
    padding) gives exactly the encoded frames, pooled statistics and logits it gives alone."""
    cfg = small(variant="audio", audio_encoder=str(save_group_norm_wav2vec2(tmp_path / "w2v-group")))
    feature_extractor, _ = build_processors(cfg)
    assert feature_extractor.do_normalize and not feature_extractor.return_attention_mask

    model = build_model(cfg).eval()
    pooled = []  # [B, 2d] per call, in call order
    original = em.masked_mean_std

    def recording_pooling(x, m):
        pooled.append(original(x, m))
        return pooled[-1]

    monkeypatch.setattr(em, "masked_mean_std", recording_pooling)
    torch.manual_seed(1)
    short_audio = torch.randn(2100)
    values = torch.randn(2, 6400) * 3  # noise in the padding
    values[0, :2100] = short_audio
    lengths = torch.tensor([2100, 6400])
    with torch.no_grad():
        frames, mask = model.encode_audio(values, lengths)
        frames_alone, mask_alone = model.encode_audio(short_audio[None], lengths[:1])
        logits = model(values, lengths).logits
        logits_alone = model(short_audio[None], lengths[:1]).logits
    assert mask.sum(1).tolist() == model.audio_encoder._get_feat_extract_output_lengths(lengths).tolist()
    real = int(mask_alone.sum())
    assert real == frames_alone.shape[1] == int(mask[0].sum()) < frames.shape[1]
    torch.testing.assert_close(frames[0, :real], frames_alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[0][0], pooled[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[0], logits_alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)  # the comparison is not trivial

    # Saved and loaded (rebuilt from its HF config): the same parameter names, the same outputs.
    model.save_pretrained(tmp_path / "model")
    loaded = EmotionModel.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(values, lengths).logits, logits, atol=0, rtol=0)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_a_trained_group_norm_conv_stack_gets_every_gradient(tmp_path, checkpointing):
    """Unfrozen (as DDP without find_unused_parameters needs): the group norm's weights too. With
    gradient checkpointing the conv layers are recomputed in backward, with the same lengths: the
    same gradients."""
    cfg = small(variant="audio", audio_encoder=str(save_group_norm_wav2vec2(tmp_path / "w2v-group")),
                freeze_feature_encoder=False)
    model = build_model(cfg).train()
    plain = copy.deepcopy(model)
    model.set_gradient_checkpointing(checkpointing)
    values, lengths, labels = torch.randn(2, 6400), torch.tensor([2100, 6400]), torch.tensor([0, 1])
    for each in (model, plain):
        torch.manual_seed(0)  # the same dropout and time masks in both
        each(values, lengths, labels=labels).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    norm = model.audio_encoder.feature_extractor.conv_layers[0].layer_norm
    assert norm.weight.requires_grad and float(norm.weight.grad.abs().sum()) > 0
    reference = plain.audio_encoder.feature_extractor.conv_layers[0].layer_norm
    torch.testing.assert_close(norm.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="lengths of 2 utterances for a batch of 3"):  # stale lengths refused
        model.audio_encoder(torch.randn(3, 6400))


def test_a_text_model_is_rejected_as_audio_encoder(tmp_path):
    BertModel(BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not an audio encoder"):
        build_model(small(variant="audio", audio_encoder=str(tmp_path / "bert")))


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # inside WavLM's attention
@pytest.mark.parametrize("norm", ["layer", "group"])  # large / base checkpoints
@pytest.mark.parametrize("audio_kind", ["hubert", "wavlm"])
def test_other_audio_encoders_and_roberta_from_folders(tmp_path, audio_kind, norm):
    """HuBERT / WavLM (AutoModel) with a RoBERTa text encoder: padding-invariant, fully trained."""
    from transformers import (
        HubertConfig,
        HubertModel,
        RobertaConfig,
        RobertaModel,
        WavLMConfig,
        WavLMModel,
    )

    kinds = {"hubert": (HubertConfig, HubertModel), "wavlm": (WavLMConfig, WavLMModel)}
    config_cls, model_cls = kinds[audio_kind]
    shape = tiny_audio_config(small()).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        shape.pop(key, None)
    if norm == "group":
        shape.update(feat_extract_norm="group", do_stable_layer_norm=False)
    torch.manual_seed(0)
    model_cls(config_cls(**shape)).save_pretrained(tmp_path / audio_kind)
    # A RoBERTa over the WordPiece vocabulary (pad id 0): RoBERTa's position ids depend on the pad id.
    RobertaModel(RobertaConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, pad_token_id=0)).save_pretrained(tmp_path / "roberta")
    build_tokenizer(small()).save_pretrained(tmp_path / "roberta")

    cfg = small(audio_encoder=str(tmp_path / audio_kind), text_encoder=str(tmp_path / "roberta"))
    model = build_model(cfg).eval()
    assert type(model.audio_encoder) is model_cls and type(model.text_encoder) is RobertaModel
    _, tokenizer = build_processors(cfg)
    short_audio, long_audio = torch.randn(2100), torch.randn(6400)
    values = torch.randn(2, 6400) * 3  # noise in the padding
    values[0, :2100], values[1] = short_audio, long_audio
    text = tokenizer(["why", "because that is what you said yesterday"], padding=True, return_tensors="pt")
    alone = tokenizer(["why"], return_tensors="pt")
    batch = (values, torch.tensor([2100, 6400]), text["input_ids"], text["attention_mask"])
    with torch.no_grad():
        batch_logits = model(*batch).logits
        alone_logits = model(
            short_audio[None], torch.tensor([2100]), alone["input_ids"], alone["attention_mask"]
        ).logits
    torch.testing.assert_close(batch_logits[:1], alone_logits, atol=1e-5, rtol=1e-5)

    model.train()
    model(*batch, labels=torch.tensor([1, 2])).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert not any(p.requires_grad for p in model.audio_encoder.feature_extractor.parameters())


def _conv_trainable(model) -> set[bool]:
    return {p.requires_grad for p in model.audio_encoder.feature_extractor.parameters()}


def test_a_random_conv_stack_is_trained_and_a_pretrained_one_frozen_by_default(tmp_path):
    # A frozen random conv stack would be a fixed random filter bank: `tiny` trains it.
    assert _conv_trainable(build_model(small(variant="audio"))) == {True}
    assert _conv_trainable(build_model(small(variant="audio", freeze_feature_encoder=True))) == {False}
    audio_dir, _ = _save_tiny_encoder_folders(tmp_path)
    pretrained = small(variant="audio", audio_encoder=str(audio_dir))
    assert pretrained.freeze_feature_encoder is None
    assert _conv_trainable(build_model(pretrained)) == {False}
    forced = small(variant="audio", audio_encoder=str(audio_dir), freeze_feature_encoder=False)
    assert _conv_trainable(build_model(forced)) == {True}


def test_check_data_fits_tiny_encoders():
    model = build_model(small())
    feature_extractor, tokenizer = build_processors(model.config)
    check_data_fits_model(DataConfig(max_text_tokens=512), model, feature_extractor, tokenizer)  # tiny BERT: 512
    with pytest.raises(ConfigError) as err:
        check_data_fits_model(DataConfig(max_text_tokens=513), model, feature_extractor, tokenizer)
    assert err.value.key == "data.max_text_tokens" and "at most 512" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_data_fits_model(DataConfig(sampling_rate=8000), model, feature_extractor, tokenizer)
    assert err.value.key == "data.sampling_rate" and "16000" in str(err.value)
    # A unimodal variant has one processor: the other check is skipped.
    audio = build_model(small(variant="audio"))
    check_data_fits_model(DataConfig(max_text_tokens=10_000), audio, feature_extractor, None)
    text = build_model(small(variant="text"))
    check_data_fits_model(DataConfig(sampling_rate=8000), text, None, tokenizer)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_max_text_tokens_is_checked_against_the_positions_the_encoder_really_has(tmp_path, kind):
    """A small position table (20 rows); RoBERTa numbers positions from pad_token_id + 1. The limit
    the check reports is exactly the longest input that runs."""
    from transformers import RobertaConfig, RobertaModel

    shape = dict(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=20, pad_token_id=0)
    encoder_cls, config_cls = (BertModel, BertConfig) if kind == "bert" else (RobertaModel, RobertaConfig)
    encoder_cls(config_cls(**shape)).save_pretrained(tmp_path / kind)
    build_tokenizer(small()).save_pretrained(tmp_path / kind)  # model_max_length 512: not sane here
    model = build_model(small(variant="text", text_encoder=str(tmp_path / kind))).eval()
    _, tokenizer = build_processors(model.config)
    limit = {"bert": 20, "roberta": 19}[kind]
    check_data_fits_model(DataConfig(max_text_tokens=limit), model, None, tokenizer)
    with pytest.raises(ConfigError, match=rf"^data\.max_text_tokens: is {limit + 1} .* at most {limit} tokens"):
        check_data_fits_model(DataConfig(max_text_tokens=limit + 1), model, None, tokenizer)
    with torch.no_grad():
        for length, runs in ((limit, True), (limit + 1, False)):
            ids = torch.full((1, length), 2000)
            try:
                model.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids))
                ran = True
            except (IndexError, RuntimeError):
                ran = False
            assert ran == runs, (kind, length)


def test_the_tokenizer_states_the_usable_length_where_it_is_sane(tmp_path):
    model = build_model(small(variant="text"))  # 512 positions
    _, tokenizer = build_processors(model.config)
    tokenizer.model_max_length = 128  # e.g. a checkpoint trained on shorter texts says so
    with pytest.raises(ConfigError, match="at most 128"):
        check_data_fits_model(DataConfig(max_text_tokens=129), model, None, tokenizer)
    tokenizer.model_max_length = int(1e30)  # transformers' "unknown" placeholder: the config decides
    check_data_fits_model(DataConfig(max_text_tokens=512), model, None, tokenizer)
