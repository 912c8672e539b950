import pytest
from hf_testing import train_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()
