"""pebook: positional encodings in Transformers, computed exactly as the papers define them.

The public API, one module per concept:

* :mod:`pebook.sinusoidal` — Vaswani et al. 2017 (arXiv:1706.03762)
* :mod:`pebook.learned` — Gehring et al. 2017 (arXiv:1705.03122), BERT, GPT-2
* :mod:`pebook.shaw` — Shaw, Uszkoreit & Vaswani 2018 (arXiv:1803.02155)
* :mod:`pebook.t5` — Raffel et al. 2020 (arXiv:1910.10683)
* :mod:`pebook.rope` — Su et al. 2021 (arXiv:2104.09864)
* :mod:`pebook.alibi` — Press, Smith & Lewis 2022 (arXiv:2108.12409)
* :mod:`pebook.rope_scaling` — RoPE context extension: PI (arXiv:2306.15595), NTK, YaRN (arXiv:2309.00071)
* :mod:`pebook.attention`, :mod:`pebook.model` — attention with any of them, and ``TinyLM``
* :mod:`pebook.generation` — autoregressive decoding with a KV cache
"""

from .alibi import alibi_bias, alibi_distance_weights, alibi_effective_window, alibi_slopes
from .attention import ENCODINGS, MultiHeadAttention, positional_attention
from . import generation
from .learned import LearnedPositionalEmbedding, learned_parameter_count
from .masking import causal_mask
from .model import TinyLM, TransformerBlock
from .plotting import plot_heatmap, plot_heatmaps, plot_lines
from .rope import (
    DEFAULT_ROPE_BASE,
    apply_rope,
    apply_rope_complex,
    rope_angles,
    rope_decay_bound,
    rope_frequencies,
    rope_layout_permutation,
)
from .rope_scaling import ROPE_SCALING_RULES, rope_scaling_frequencies, wavelength_table
from .shaw import reachable_offsets, relative_position_index, shaw_attention, shaw_attention_naive
from .sinusoidal import (
    fit_shift_map,
    sinusoidal_dot_profile,
    sinusoidal_encoding,
    sinusoidal_frequencies,
    sinusoidal_shift_matrix,
)
from .t5 import T5RelativeBias, t5_relative_bucket
from .utils import default_device, seed_everything

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ROPE_BASE",
    "ENCODINGS",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "ROPE_SCALING_RULES",
    "T5RelativeBias",
    "TinyLM",
    "TransformerBlock",
    "alibi_bias",
    "alibi_distance_weights",
    "alibi_effective_window",
    "alibi_slopes",
    "apply_rope",
    "apply_rope_complex",
    "causal_mask",
    "default_device",
    "fit_shift_map",
    "learned_parameter_count",
    "plot_heatmap",
    "plot_heatmaps",
    "plot_lines",
    "positional_attention",
    "reachable_offsets",
    "relative_position_index",
    "rope_angles",
    "rope_decay_bound",
    "rope_frequencies",
    "rope_layout_permutation",
    "rope_scaling_frequencies",
    "seed_everything",
    "shaw_attention",
    "shaw_attention_naive",
    "sinusoidal_dot_profile",
    "sinusoidal_encoding",
    "sinusoidal_frequencies",
    "sinusoidal_shift_matrix",
    "t5_relative_bucket",
    "wavelength_table",
]
