"""The registry of positional encodings: one line per encoding.

Like ``ROPE_INIT_FUNCTIONS`` in ``transformers``, :data:`ENCODINGS` maps a name to the class that
implements it (a :class:`pebook.encoding.PositionalEncoding`). Everything that iterates over
encodings — attention, ``TinyLM``, generation, the benchmark, the experiments and the tests —
reads this mapping, so adding an encoding is one module, one line here and one test module.
"""

from __future__ import annotations

import inspect

from .alibi import ALiBi
from .cope import CoPE
from .encoding import PositionalEncoding
from .fire import FIRE
from .kerple import Kerple
from .learned import LearnedPE
from .none import NoPE
from .rope import RoPE
from .shaw import ShawPE
from .sinusoidal import SinusoidalPE
from .t5 import T5PE
from .xpos import XPos

__all__ = ["ENCODINGS", "STRUCTURAL_ARGUMENTS", "check_encoding", "encoding_options", "build_encoding"]

ENCODINGS: dict[str, type[PositionalEncoding]] = {
    "none": NoPE,
    "sinusoidal": SinusoidalPE,
    "learned": LearnedPE,
    "shaw": ShawPE,
    "t5": T5PE,
    "rope": RoPE,
    "alibi": ALiBi,
    "kerple": Kerple,
    "cope": CoPE,
    "xpos": XPos,
    "fire": FIRE,
}

#: the arguments a layer hands every encoding that asks for them (by naming them in ``__init__``)
STRUCTURAL_ARGUMENTS = ("dim", "n_heads", "head_dim", "causal")


def check_encoding(encoding) -> str:
    """Return ``encoding`` if it names a registered encoding, else raise ``ValueError``."""
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {tuple(ENCODINGS)}, got {encoding!r}")
    return encoding


def encoding_options(encoding: str) -> dict[str, object]:
    """The options an encoding takes, with their defaults (``inspect.Parameter.empty`` if required)."""
    signature = inspect.signature(ENCODINGS[check_encoding(encoding)].__init__)
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if name != "self" and name not in STRUCTURAL_ARGUMENTS and p.kind == p.KEYWORD_ONLY
    }


def build_encoding(encoding: str, *, dim: int, n_heads: int, head_dim: int, causal: bool, **options):
    """Instantiate a registered encoding for a layer of this shape, with its own ``options``.

    An option the encoding does not take raises ``TypeError`` naming the options it does take.
    """
    cls = ENCODINGS[check_encoding(encoding)]
    allowed = encoding_options(encoding)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"encoding={encoding!r} takes no option {unknown[0]!r}; its options are {sorted(allowed) or 'none'}"
        )
    missing = [name for name, default in allowed.items() if default is inspect.Parameter.empty and name not in options]
    if missing:
        raise TypeError(f"encoding={encoding!r} needs the option {missing[0]!r}")
    structural = dict(dim=dim, n_heads=n_heads, head_dim=head_dim, causal=causal)
    wanted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in structural.items() if k in wanted}, **options)
