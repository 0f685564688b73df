"""Masked token transformer with text cross-attention, and the text encoder wrapper."""
