"""Audio out: frame encoders, containers and resampling."""
