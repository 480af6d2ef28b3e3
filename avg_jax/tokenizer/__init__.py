"""AVG stage 1: cross-modal aligned image tokenization (residual quantization + semantic alignment)."""
