"""Learned absolute positional embeddings.

A trainable table with one vector per position, added to the token embeddings: Gehring, Auli,
Grangier, Yarats & Dauphin (2017), "Convolutional Sequence to Sequence Learning",
arXiv:1705.03122, §3.1; used by BERT (Devlin et al. 2019, arXiv:1810.04805; 512 positions) and
GPT-2 (Radford et al. 2019; 1024 positions). The table has ``max_positions × dim`` parameters
and no entry at all for a position ``>= max_positions``: such a model cannot even be run on a
longer sequence, let alone extrapolate to it.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_int, check_positive_float
from .encoding import PositionalEncoding

__all__ = ["LearnedPositionalEmbedding", "LearnedPE", "learned_parameter_count"]

#: BERT initialises its position table from N(0, 0.02²) (``initializer_range``); GPT-2 uses 0.01.
DEFAULT_INIT_STD = 0.02


class LearnedPositionalEmbedding(nn.Module):
    """A ``(max_positions, dim)`` trainable table of absolute position vectors.

    ``forward(n_positions, offset=0)`` returns the rows for positions
    ``offset … offset + n_positions - 1``, with the same signature as
    :func:`pebook.sinusoidal_encoding`. Rows are initialised from ``N(0, init_std²)``, with
    ``init_std = 0.02`` as in BERT (Devlin et al. 2019; GPT-2 uses 0.01).
    """

    def __init__(self, max_positions: int, dim: int, *, init_std: float = DEFAULT_INIT_STD):
        super().__init__()
        self.max_positions = check_int("max_positions", max_positions, minimum=1)
        self.dim = check_int("dim", dim, minimum=1)
        self.init_std = check_positive_float("init_std", init_std)
        self.weight = nn.Parameter(torch.randn(self.max_positions, self.dim) * self.init_std)

    def forward(self, n_positions: int, offset: int = 0) -> torch.Tensor:
        n_positions = check_int("n_positions", n_positions, minimum=0)
        offset = check_int("offset", offset, minimum=0)
        self.check_positions(offset + n_positions - 1)
        return self.weight[offset : offset + n_positions]

    def check_positions(self, last_position: int) -> None:
        """Raise ``ValueError`` unless ``last_position`` has a row in the table."""
        if last_position >= self.max_positions:
            raise ValueError(
                f"position {last_position} is beyond this learned table: it has max_positions={self.max_positions} "
                f"rows (positions 0..{self.max_positions - 1}). A learned absolute embedding has no vector for "
                "unseen positions."
            )

    def extra_repr(self) -> str:
        return f"max_positions={self.max_positions}, dim={self.dim}, init_std={self.init_std:g}"


class LearnedPE(PositionalEncoding):
    """Registry entry ``"learned"``: row ``position_ids`` of a trainable table, added to the embeddings.

    Options ``max_positions`` (required: the table size) and ``init_std`` (0.02).
    """

    name = "learned"
    place = "input"
    example_options = {"max_positions": 64}

    def __init__(self, *, dim: int, max_positions: int, init_std: float = DEFAULT_INIT_STD):
        super().__init__()
        self.table = LearnedPositionalEmbedding(max_positions, dim, init_std=init_std)
        self.dim = self.table.dim

    def declared_parameters(self):
        return {"table.weight": ((self.table.max_positions, self.table.dim), True)}

    def check_positions(self, last_position: int) -> None:
        self.table.check_positions(last_position)

    def embed(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.table.weight[position_ids].to(dtype)


def learned_parameter_count(max_positions: int, dim: int) -> int:
    """Trainable parameters of a learned absolute table: ``max_positions × dim``.

    The table of Gehring et al. (2017, arXiv:1705.03122, §3.1) holds one ``dim``-vector per
    position. The count is fixed when the model is built and does not depend on the length of
    the inputs: BERT-base, 512 positions × 768, has 393,216 (Devlin et al. 2019,
    arXiv:1810.04805); GPT-2 small, 1024 × 768, has 786,432 (Radford et al. 2019).
    """
    max_positions = check_int("max_positions", max_positions, minimum=1)
    dim = check_int("dim", dim, minimum=1)
    return max_positions * dim
