"""pebook.utils: seed_everything and default_device (PEBOOK_DEVICE)."""

import random

import numpy as np
import pytest
import torch

from pebook import default_device, seed_everything


def draw(device):
    return (
        random.random(),
        float(np.random.rand()),
        torch.randn(4, device=device).cpu(),
        torch.rand(2, device=device).cpu(),
    )


def test_seed_everything_makes_every_generator_reproducible(device):
    seed_everything(1234)
    first = draw(device)
    seed_everything(1234)
    second = draw(device)
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    seed_everything(1235)
    other = draw(device)
    assert other[0] != first[0] and other[1] != first[1] and not torch.equal(other[2], first[2])


def test_snapshot_seed_zero_matches_the_libraries_published_streams():
    """Well-known first draws after seeding with 0 (printed in the torch, Python and NumPy
    documentation/tutorials countless times): torch.rand → 0.4963, 0.7682, 0.0885;
    torch.randn → 1.5410, -0.2934, -2.1788; random.random() → 0.8444218515250481;
    np.random.rand() → 0.5488135039273248. seed_everything must seed all three the same way
    their own seed functions do."""
    seed_everything(0)
    torch.testing.assert_close(torch.rand(3), torch.tensor([0.4963, 0.7682, 0.0885]), rtol=0, atol=1e-4)
    seed_everything(0)
    torch.testing.assert_close(torch.randn(3), torch.tensor([1.5410, -0.2934, -2.1788]), rtol=0, atol=1e-4)
    seed_everything(0)
    assert random.random() == 0.8444218515250481
    assert float(np.random.rand()) == 0.5488135039273248


@pytest.mark.parametrize(
    "seed,error,pattern",
    [
        (-1, ValueError, r"seed must be an int >= 0, got -1$"),
        (1.5, TypeError, r"seed must be an int, got 1.5 of type float"),
        (True, TypeError, r"seed must be an int, got True of type bool"),
        ("0", TypeError, r"seed must be an int, got '0' of type str"),
    ],
)
def test_seed_everything_rejects_bad_seeds(seed, error, pattern):
    with pytest.raises(error, match=pattern):
        seed_everything(seed)


# ---------------------------------------------------------------- default_device


@pytest.mark.parametrize("value", ["cpu", "  cpu  ", "cpu\n"])
def test_pebook_device_cpu_is_honoured(monkeypatch, value):
    monkeypatch.setenv("PEBOOK_DEVICE", value)
    assert default_device() == torch.device("cpu")


@pytest.mark.parametrize("value", [None, "", "   "])
def test_without_pebook_device_cuda_is_used_when_available(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("PEBOOK_DEVICE", raising=False)
    else:
        monkeypatch.setenv("PEBOOK_DEVICE", value)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device().type == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")


@pytest.mark.parametrize("value", ["tpu", "gpu", "cuda:x", "cpu cuda"])
def test_pebook_device_that_is_no_device_is_rejected(monkeypatch, value):
    monkeypatch.setenv("PEBOOK_DEVICE", value)
    with pytest.raises(ValueError, match=rf"PEBOOK_DEVICE='{value}' is not a device; use 'cpu', 'cuda' or 'cuda:N'"):
        default_device()


@pytest.mark.parametrize("value", ["meta", "mps", "xpu"])
def test_pebook_device_that_is_unsupported_is_rejected(monkeypatch, value):
    monkeypatch.setenv("PEBOOK_DEVICE", value)
    with pytest.raises(ValueError, match=rf"PEBOOK_DEVICE='{value}' is not supported; use 'cpu', 'cuda' or 'cuda:N'"):
        default_device()


@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:3"])
def test_pebook_device_cuda_without_cuda_is_an_error(monkeypatch, value):
    """Asking for CUDA where there is none raises instead of silently falling back (CUDA is made
    unavailable with monkeypatch so this runs on every machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PEBOOK_DEVICE", value)
    with pytest.raises(ValueError, match=rf"PEBOOK_DEVICE='{value}' but CUDA is not available on this machine"):
        default_device()


@pytest.mark.cuda
def test_pebook_device_cuda_with_cuda(monkeypatch, cuda_device):
    monkeypatch.setenv("PEBOOK_DEVICE", "cuda:0")
    assert default_device() == torch.device("cuda:0")
    monkeypatch.setenv("PEBOOK_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")  # the variable overrides an available GPU
