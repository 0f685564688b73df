"""Masked token transformer with text cross-attention, aMUSEd's U-ViT (uvit.py), and the text encoder wrapper."""
