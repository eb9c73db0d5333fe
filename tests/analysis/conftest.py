"""Shared fixtures of the analysis tests: a seeded CA tensor and a random generator."""

import numpy as np
import pytest
import torch

CA_SHAPE = (3, 2, 5, 40)  # layers, heads, tokens, enc_frames


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def ca():
    return torch.softmax(torch.randn(*CA_SHAPE, generator=torch.Generator().manual_seed(0)), -1)
