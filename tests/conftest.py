import pytest

from moegpt.data.sources import shakespeare_source


@pytest.fixture
def small_source_path(tmp_path_factory):
    """A ~60 KB slice of the packaged corpus as a file, so training runs take seconds."""
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(shakespeare_source().paths[0].read_text()[:60_000])
    return path
