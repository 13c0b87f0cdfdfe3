import os
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def deadline():
    """Fail a test that would hang when the code it checks regresses (a loop that never ends, a lock
    never granted) instead of stalling the suite: 120 s, then TimeoutError."""
    def hung(*_):
        raise TimeoutError("past the test's 120 s deadline: the code under test hangs")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def tiny_cfg():
    from model import ModelConfig
    return ModelConfig(vocab_size=10, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_ffn=64, mask_id=0)


@pytest.fixture
def tiny_llm():
    """A random tiny block-diffusion LLM with a relay channel (untied head so tokens vary)."""
    from model import QWEN2, ModelConfig, Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(**{**QWEN2, "vocab_size": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32,
                         "n_ffn": 64, "tie_embeddings": False, "mask_id": 63, "bd_size": 8, "relay": True})
    return Transformer(cfg).eval()
