"""Unit tests of the pure modules: plain values and bytes, no sockets."""
