import pytest
import torch

from moegpt.data.sources import shakespeare_source


@pytest.fixture
def small_source_path(tmp_path_factory):
    """A ~60 KB slice of the packaged corpus as a file, so training runs take seconds."""
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(shakespeare_source().paths[0].read_text()[:60_000])
    return path


# Slow: tests that start torchrun groups or servers, or train a model. `make test-quick` skips them.
SLOW_FILES = {"test_parity.py", "test_vision_training.py", "test_vision_dp.py", "test_train_cli.py", "test_finetune_cli.py", "test_finetuned.py", "test_resume.py", "test_hf_generate.py", "test_serving_parity.py", "test_sharded_server.py", "test_serving_collectives.py"}
SLOW_FIXTURES = {"servers", "server", "tight_server", "drain_server", "keyed", "vision_server"}


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if item.path.name in SLOW_FILES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
