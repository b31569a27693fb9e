"""Kokoro-82M's hyperparameters, so KModel is built from a dict instead of the hub's config.json.

Every value was checked against the tensor shapes of the embedded int8 ONNX graph (see
docs/research/issue3/inventory.md): e.g. n_token 178 from the embeddings, max_dur 50 from
duration_proj, n_fft 20 from the noise convolutions, upsample kernels 20/12 from the ups weights.
"""

from __future__ import annotations

from typing import Any

# The keys KModel reads from a config.json; the others (dim_in, max_conv_dim, multispeaker) it ignores.
KMODEL_KEYS = (
    "vocab",
    "n_token",
    "plbert",
    "hidden_dim",
    "style_dim",
    "n_layer",
    "max_dur",
    "dropout",
    "text_encoder_kernel_size",
    "n_mels",
    "istftnet",
)


def kokoro_config(vocab: dict[str, int]) -> dict[str, Any]:
    """KModel's config for Kokoro-82M with the model's own phoneme vocabulary."""
    return {
        "istftnet": {
            "upsample_kernel_sizes": [20, 12],
            "upsample_rates": [10, 6],
            "gen_istft_hop_size": 5,
            "gen_istft_n_fft": 20,
            "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
            "resblock_kernel_sizes": [3, 7, 11],
            "upsample_initial_channel": 512,
        },
        "dim_in": 64,
        "dropout": 0.2,
        "hidden_dim": 512,
        "max_conv_dim": 512,
        "max_dur": 50,
        "multispeaker": True,
        "n_layer": 3,
        "n_mels": 80,
        "n_token": 178,
        "style_dim": 128,
        "text_encoder_kernel_size": 5,
        "plbert": {
            "hidden_size": 768,
            "num_attention_heads": 12,
            "intermediate_size": 2048,
            "max_position_embeddings": 512,
            "num_hidden_layers": 12,
            "dropout": 0.1,
        },
        "vocab": dict(vocab),
    }
