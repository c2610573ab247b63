"""The registry's encodings as test cases, shared by the test modules (``from registry_cases import ...``).

Every test that iterates over encodings reads these, never a list of names.
"""

import inspect

import pebook

ENCODING_NAMES = tuple(pebook.ENCODINGS)
BIAS_ENCODINGS = tuple(n for n, c in pebook.ENCODINGS.items() if issubclass(c, pebook.LogitBias))


def example_options(name: str) -> dict:
    """The registry's small, valid options for ``name`` (a copy, safe to modify)."""
    return dict(pebook.ENCODINGS[name].example_options)


def layer_options(name: str) -> dict:
    """Options for ``MultiHeadAttention(..., name, **options)`` / ``TinyLM``: the example options."""
    return example_options(name)


def model_options(name: str) -> dict:
    """Options for ``TinyLM(..., name, **options)``: the example options minus those TinyLM takes
    itself (``max_positions``, which it hands to an encoding that has that option)."""
    own = inspect.signature(pebook.TinyLM).parameters
    return {k: v for k, v in example_options(name).items() if k not in own}
