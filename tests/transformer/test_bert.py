"""transformer/bert.py, the transformers-free BERT: the same token ids as transformers' fast tokenizer and the same
states as `transformers.BertModel`, on the bundled MiniLM and on a tiny random BERT; unsupported BERT variants go
to transformers; a local BERT text encoder saves and loads back."""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from transformer import bert
from transformer.config import TextEncoderConfig
from transformer.text import TextEncoder, _resolve

PROMPTS = ["red apple, noto style", "", "a very long prompt " * 20, "héllo wörld 😀 emoji", "flag: Japan", "  A  B  "]


def reference(directory, prompts, max_length):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = BertModel.from_pretrained(directory).eval()
    batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    return batch["input_ids"], mask, states.masked_fill(~mask[..., None], 0.0)


@pytest.mark.filterwarnings("ignore:the prompt")
def test_minilm_matches_transformers():
    directory, _ = _resolve("minilm")
    encoder = TextEncoder(TextEncoderConfig("minilm", kind="auto", max_length=32))
    assert isinstance(encoder.model, bert.BertEncoder) and isinstance(encoder.tokenizer, bert.BertTokenizer)
    ids, mask, states = reference(directory, PROMPTS, 32)
    ours_ids, ours_mask = encoder.tokenizer(PROMPTS, 32)
    assert torch.equal(ours_ids, ids) and torch.equal(ours_mask, mask)
    out = encoder(PROMPTS)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.states, states, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random two-layer BERT over MiniLM's vocabulary, saved as transformers saves it, with MiniLM's tokenizer."""
    path = tmp_path_factory.mktemp("tiny-bert")
    minilm, _ = _resolve("minilm")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(f"{minilm}/{name}", path / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=24)
    BertModel(config).save_pretrained(path)
    return path


def test_a_tiny_bert_matches_transformers(tiny_bert):
    encoder = TextEncoder(TextEncoderConfig(str(tiny_bert), kind="auto", max_length=16))
    assert isinstance(encoder.model, bert.BertEncoder) and encoder.dim == 32
    ids, mask, states = reference(tiny_bert, PROMPTS[:2] + PROMPTS[3:], 16)
    out = encoder(PROMPTS[:2] + PROMPTS[3:])
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.states, states, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_length 30 exceeds the 24 positions"):
        TextEncoder(TextEncoderConfig(str(tiny_bert), kind="auto", max_length=30))


def test_unsupported_bert_variants_go_to_transformers(tiny_bert, tmp_path):
    variant = tmp_path / "relative"
    shutil.copytree(tiny_bert, variant)
    config = json.loads((variant / "config.json").read_text())
    (variant / "config.json").write_text(json.dumps(config | {"position_embedding_type": "relative_key"}))
    assert bert.supported(tiny_bert) and not bert.supported(variant)
    encoder = TextEncoder(TextEncoderConfig(str(variant), kind="auto", max_length=16))
    assert isinstance(encoder.model, BertModel)


def test_a_local_bert_saves_and_loads_back(tiny_bert, tmp_path):
    encoder = TextEncoder(TextEncoderConfig(str(tiny_bert), kind="auto", max_length=16))
    encoder.save_pretrained(tmp_path / "copy")
    again = TextEncoder(TextEncoderConfig(str(tmp_path / "copy"), kind="auto", max_length=16))
    assert torch.equal(again(["a red apple"]).states, encoder(["a red apple"]).states)


def test_truncation_keeps_the_final_sep():
    directory, _ = _resolve("minilm")
    tokenizer = bert.BertTokenizer(directory)
    ids, mask = tokenizer(["one two three four five six"], max_length=4)
    sep = tokenizer._tokenizer.token_to_id("[SEP]")
    assert mask.all() and ids[0, -1] == sep and tokenizer.lengths(["one two three four five six"]) == [8]
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        tokenizer(["a"], max_length=1)
