import pytest

from moegpt.config import preset
from moegpt.data.sources import Source, shakespeare_source
from moegpt.train.config import TrainConfig


@pytest.fixture
def small_source(tmp_path_factory):
    """~60 KB of the packaged corpus as a one-file source, so runs take seconds."""
    d = tmp_path_factory.mktemp("corpus")
    text = shakespeare_source().paths[0].read_text()[:60_000]
    (d / "plays.txt").write_text(text)
    return (Source(name="plays", epochs=2.0, paths=(d / "plays.txt",)),)


@pytest.fixture
def micro_model():
    return preset("tiny").replace(vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=64, n_experts=4, max_seq_len=64)


@pytest.fixture
def micro_train():
    return TrainConfig(steps=8, seq_len=32, batch_size=8, micro_batch=4, batch_start=4, ramp_tokens=512,
                       warmup_steps=2, eval_every=4, ckpt_every=3, eval_sequences=8, peak_flops=1e11)
