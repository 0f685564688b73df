"""Mask schedules, parallel decoding and editing masks. Knows nothing of networks or text."""
