"""Token-space super-resolution transformer (low-res token grid -> high-res token grid)."""
