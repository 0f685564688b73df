"""A BERT encoder and its tokenizer without `transformers`: the bundled text encoder (MiniLM) in plain PyTorch.

Importing `transformers` takes seconds (it pulls in torch._dynamo), several times what generating an image with
the bundled model does; this file reads the same Hugging Face model directory -- `config.json`, `model.safetensors`
and `tokenizer.json` -- with `safetensors` and the Rust `tokenizers` library only. `TextEncoder` uses it for every
BERT directory it supports (`BertConfig.from_hf`: absolute positions, GELU) and `transformers` for everything else;
`tests/transformer/test_bert.py` checks it against `transformers.BertModel`.

    tokenizer, model = BertTokenizer(directory), BertEncoder.from_pretrained(directory)
    ids, mask = tokenizer(["a red apple"], max_length=32)        # (1, 32) long, (1, 32) bool
    states = model(ids, mask)                                    # (1, 32, 384)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persist import read_json_object


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> BertConfig | None:
        """The config of a Hugging Face BERT `config.json`, or None when it uses something this file does not
        implement (then `transformers` loads it)."""
        if (config.get("model_type") != "bert" or config.get("hidden_act", "gelu") != "gelu"
                or config.get("position_embedding_type", "absolute") != "absolute"
                or config.get("is_decoder", False) or config.get("add_cross_attention", False)):
            return None
        return cls(**{name: config[name] for name in cls.__dataclass_fields__})


class Layer(nn.Module):
    """Post-LayerNorm block: self-attention, then a GELU MLP, each added to its input before its LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.attn_out = nn.Linear(D, D)
        self.attn_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.fc = nn.Linear(D, config.intermediate_size)
        self.proj = nn.Linear(config.intermediate_size, D)
        self.mlp_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """(B, S, D) states, (B, 1, 1, S) additive key bias -> (B, S, D)."""
        B, S, D = x.shape
        H = self.num_heads

        def heads(t: Tensor) -> Tensor:
            return t.view(B, S, H, D // H).transpose(1, 2)  # (B, H, S, Dh)

        y = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                           attn_mask=bias)
        x = self.attn_norm(x + self.attn_out(y.transpose(1, 2).reshape(B, S, D)))
        return self.mlp_norm(x + self.proj(F.gelu(self.fc(x))))


class BertEncoder(nn.Module):
    """BERT's encoder: token + position + token-type (always type 0) embeddings, LayerNorm, then the layers.
    The pooler is not built: only the per-token states are used."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.tokens = nn.Embedding(config.vocab_size, D)
        self.positions = nn.Embedding(config.max_position_embeddings, D)
        self.token_types = nn.Embedding(config.type_vocab_size, D)
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, S) token ids, (B, S) bool mask (True = real token) -> (B, S, D) last-layer states."""
        S = ids.shape[1]
        if S > self.config.max_position_embeddings:
            raise ValueError(f"{S} tokens exceed the encoder's {self.config.max_position_embeddings} positions")
        x = self.tokens(ids) + self.positions.weight[:S] + self.token_types.weight[0]  # (B, S, D)
        x = self.norm(x)
        # Padding keys get the dtype's most negative value (as transformers does), not -inf: a row that is all
        # padding then stays finite.
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, torch.finfo(x.dtype).min)
        bias = bias[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.layers:
            x = layer(x, bias)
        return x

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> BertEncoder:
        """The encoder of a Hugging Face BERT directory (config.json + model.safetensors); ValueError when the
        config is not one `BertConfig.from_hf` supports or a weight is missing."""
        from persist.weights import load_state_dict_strict, load_unhashed_safetensors

        directory = Path(directory)
        config = BertConfig.from_hf(read_json_object(directory / "config.json"))
        if config is None:
            raise ValueError(f"{directory} is not a BERT model this encoder implements")
        weights_file = directory / "model.safetensors"
        if not weights_file.is_file():
            raise FileNotFoundError(f"{weights_file} not found (only safetensors weights are read here)")
        model = cls(config)
        hf = load_unhashed_safetensors(weights_file)  # a Hugging Face download: safetensors only, no pickle
        prefix = "bert." if any(k.startswith("bert.") for k in hf) else ""
        state = {}
        for name in model.state_dict():
            key = prefix + _hf_name(name)
            if key not in hf:
                raise ValueError(f"{weights_file} has no weight {key!r}")
            state[name] = hf[key]
        load_state_dict_strict(model, state, str(weights_file))
        return model.to(dtype)


def _hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face BertModel's (e.g. layers.0.fc.weight ->
    encoder.layer.0.intermediate.dense.weight)."""
    top = {"tokens": "embeddings.word_embeddings", "positions": "embeddings.position_embeddings",
           "token_types": "embeddings.token_type_embeddings", "norm": "embeddings.LayerNorm"}
    first, rest = name.split(".", 1)
    if first in top:
        return f"{top[first]}.{rest}"
    _, index, module, param = name.split(".")  # layers.N.module.param
    inner = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
             "fc": "intermediate.dense", "proj": "output.dense", "mlp_norm": "output.LayerNorm"}
    return f"encoder.layer.{index}.{inner[module]}.{param}"


class BertTokenizer:
    """The directory's `tokenizer.json` through the Rust `tokenizers` library: the same ids as transformers' fast
    tokenizer with `padding="max_length", truncation=True`."""

    def __init__(self, directory: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        special = read_json_object(Path(directory) / "tokenizer_config.json") \
            if (Path(directory) / "tokenizer_config.json").is_file() else {}
        self.pad_token = special.get("pad_token", "[PAD]")
        self.pad_id = self._tokenizer.token_to_id(self.pad_token)
        if self.pad_id is None:
            raise ValueError(f"{path} has no padding token {self.pad_token!r}")

    def lengths(self, prompts: list[str]) -> list[int]:
        """Each prompt's length in tokens, special tokens included, before any truncation."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(prompts)]

    def __call__(self, prompts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        """-> ids (B, max_length) long and mask (B, max_length) bool: truncated (keeping the final [SEP]) and
        padded to `max_length`."""
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (the [CLS] and [SEP] tokens), got {max_length}")
        ids = torch.full((len(prompts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), max_length, dtype=torch.bool)
        for i, encoding in enumerate(self._tokenizer.encode_batch(prompts)):
            row = encoding.ids
            if len(row) > max_length:
                row = row[: max_length - 1] + row[-1:]  # the body truncated, the [SEP] kept, as transformers does
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        return ids, mask


# What this file reads from a model directory; the first three are required.
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def supported(directory: str | Path) -> bool:
    """Whether `directory` holds a BERT model (config.json, model.safetensors, tokenizer.json) that this file
    loads; anything else is left to transformers."""
    directory = Path(directory)
    files = [directory / name for name in FILES[:3]]
    if not all(f.is_file() for f in files):
        return False
    try:
        return BertConfig.from_hf(read_json_object(files[0])) is not None
    except (ValueError, KeyError, TypeError):
        return False


__all__ = ["FILES", "BertConfig", "BertEncoder", "BertTokenizer", "supported"]
