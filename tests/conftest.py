"""Shared test set-up: Triton's interpreter on machines without CUDA, fixed seeds, small fixtures.

TRITON_INTERPRET must be set before anything imports triton, so it is decided here,
when pytest loads this file, before any test module is imported.
"""

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The project's files live at the repository root, one level up.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def stdlib_texts():
    """About 300 KB of real text: standard-library source files (every 24th file)."""
    import tokenizer

    return [tokenizer._read_text(p) for p in tokenizer.stdlib_sources()[::24]]


@pytest.fixture(scope="session")
def small_tokenizer(stdlib_texts):
    """A 512-token vocabulary trained on `stdlib_texts`, shared by tests that need a tokenizer."""
    import tokenizer

    return tokenizer.Tokenizer.train(stdlib_texts, vocab_size=512, verbose=False)
