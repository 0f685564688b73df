"""Vector-quantised image tokenizer: images <-> discrete token ids."""
