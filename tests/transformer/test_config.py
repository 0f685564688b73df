import pytest

from transformer.config import TextEncoderConfig, TransformerConfig


def test_mask_token_is_one_past_the_codebook():
    cfg = TransformerConfig(codebook_size=16, grid_size=4, width=32, depth=1, num_heads=4, text_dim=8)
    assert cfg.mask_token_id == 16 and cfg.vocab_size == 17


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(width=30, num_heads=4), r"width \(30\) must be divisible by num_heads \(4\)"),
        (dict(codebook_size=1), "codebook_size must be >= 2"),
        (dict(depth=0), "depth must be >= 1"),
        (dict(grid_size=0), "grid_size must be >= 1"),
        (dict(mlp_ratio=0.0), "mlp_ratio must be > 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_transformer_config_rejects_bad_values(change, message):
    base = dict(codebook_size=16, grid_size=4, width=32, depth=1, num_heads=4, text_dim=8)
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**base, **change})


def test_text_encoder_config_validation():
    assert TextEncoderConfig("minilm", kind="auto").max_length == 77
    with pytest.raises(ValueError, match="kind must be one of"):
        TextEncoderConfig("minilm", kind="bert")
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        TextEncoderConfig("minilm", kind="auto", max_length=0)
    with pytest.raises(ValueError, match="name_or_path must not be empty"):
        TextEncoderConfig("", kind="t5")
