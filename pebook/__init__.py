"""pebook: positional encodings in Transformers, computed exactly as the papers define them.

The library, one module per concept:

* :mod:`pebook.encoding` — the protocol: where position enters attention (input, q/k, logits,
  key and value); :mod:`pebook.registry` — ``ENCODINGS``, one line per encoding
* :mod:`pebook.none` — no position (NoPE)
* :mod:`pebook.sinusoidal` — Vaswani et al. 2017 (arXiv:1706.03762)
* :mod:`pebook.learned` — Gehring et al. 2017 (arXiv:1705.03122), BERT, GPT-2
* :mod:`pebook.shaw` — Shaw, Uszkoreit & Vaswani 2018 (arXiv:1803.02155)
* :mod:`pebook.t5` — Raffel et al. 2020 (arXiv:1910.10683)
* :mod:`pebook.rope` — Su et al. 2021 (arXiv:2104.09864)
* :mod:`pebook.alibi` — Press, Smith & Lewis 2022 (arXiv:2108.12409)
* :mod:`pebook.rope_scaling` — RoPE context extension: PI (arXiv:2306.15595), NTK, YaRN (arXiv:2309.00071)
* :mod:`pebook.attention`, :mod:`pebook.model`, :mod:`pebook.cache` — attention with any of
  them, ``TinyLM``, the KV cache; :mod:`pebook.flex` — logit biases on FlexAttention
  (arXiv:2412.05496)
* :mod:`pebook.generation` — autoregressive decoding with a KV cache

The book's own support code (errata runner, corpus, training, experiments, benchmark, plotting)
lives in :mod:`pebook.book` and is not imported here: ``import pebook`` loads neither
matplotlib nor any data.
"""

from . import generation
from .alibi import ALiBi, alibi_bias, alibi_distance_weights, alibi_effective_window, alibi_slopes
from .attention import MultiHeadAttention, positional_attention
from .cache import KVCache
from .encoding import ATTENTION_IMPLEMENTATIONS, PLACES, LogitBias, PositionalEncoding
from .flex import FlexAttentionFallbackWarning, flex_logit_bias_attention
from .learned import LearnedPE, LearnedPositionalEmbedding, learned_parameter_count
from .masking import causal_mask
from .model import TinyLM, TransformerBlock
from .none import NoPE
from .registry import ENCODINGS, build_encoding, encoding_options
from .rope import (
    DEFAULT_ROPE_BASE,
    RoPE,
    apply_rope,
    apply_rope_complex,
    rope_angles,
    rope_decay_bound,
    rope_frequencies,
    rope_layout_permutation,
)
from .rope_scaling import ROPE_SCALING_RULES, rope_scaling_frequencies, wavelength_table
from .shaw import ShawPE, reachable_offsets, relative_position_index, shaw_attention, shaw_attention_naive
from .sinusoidal import (
    SinusoidalPE,
    fit_shift_map,
    sinusoidal_dot_profile,
    sinusoidal_encoding,
    sinusoidal_frequencies,
    sinusoidal_shift_matrix,
)
from .t5 import T5PE, T5RelativeBias, t5_relative_bucket
from .utils import default_device, seed_everything

__version__ = "0.2.0"

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "ALiBi",
    "DEFAULT_ROPE_BASE",
    "ENCODINGS",
    "FlexAttentionFallbackWarning",
    "KVCache",
    "LearnedPE",
    "LearnedPositionalEmbedding",
    "LogitBias",
    "MultiHeadAttention",
    "NoPE",
    "PLACES",
    "PositionalEncoding",
    "ROPE_SCALING_RULES",
    "RoPE",
    "ShawPE",
    "SinusoidalPE",
    "T5PE",
    "T5RelativeBias",
    "TinyLM",
    "TransformerBlock",
    "alibi_bias",
    "alibi_distance_weights",
    "alibi_effective_window",
    "alibi_slopes",
    "apply_rope",
    "apply_rope_complex",
    "build_encoding",
    "causal_mask",
    "default_device",
    "encoding_options",
    "fit_shift_map",
    "flex_logit_bias_attention",
    "generation",
    "learned_parameter_count",
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
