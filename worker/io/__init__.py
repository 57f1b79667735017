"""Checkpoint I/O: the safetensors byte layout, byte-range sources, and the sharded writer."""
