"""parse_device: every --device string either names a device this machine has, or gets a one-line fix."""

import pytest
import torch

from dllm.device import parse_device
from dllm.errors import BackendError, ConfigError


@pytest.mark.parametrize("text, error, message", [
    ("bogus", ConfigError, r"'bogus' is not a device; use cpu, cuda or cuda:N"),
    ("cuda:abc", ConfigError, r"'cuda:abc' is not a device"),
    ("cuda:-1", ConfigError, r"is not a device"),
    ("meta", ConfigError, r"device type 'meta' is not supported"),
    ("mps", ConfigError, r"device type 'mps' is not supported"),
    (3, ConfigError, r"must be a string such as 'cpu'"),
])
def test_not_a_device(text, error, message):
    with pytest.raises(error, match=message):
        parse_device(text)


def test_cpu_and_cuda():
    assert parse_device(" cpu ") == torch.device("cpu")
    assert parse_device(torch.device("cpu")).type == "cpu"
    if torch.cuda.is_available():
        assert parse_device("cuda").type == "cuda"
        with pytest.raises(BackendError, match=r"cuda:99.*has \d+ CUDA device\(s\)"):
            parse_device("cuda:99")
    else:
        with pytest.raises(BackendError, match=r"this torch build .* sees none .*use --device cpu"):
            parse_device("cuda:0")
    assert parse_device("cuda:7", check_available=False) == torch.device("cuda", 7)
