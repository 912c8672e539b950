import sys
from pathlib import Path

import pytest

# The tiny models and tokenizer helpers live with the export tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))

from hf_testing import train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()
