"""Real server processes on 127.0.0.1 (free ports), serving a tiny model made here.

The servers start together at the first test that needs one (each takes a few seconds to import
and load) and are stopped at the end of the session.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TEXT = ("to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles\n") * 30
CONTEXT = 256


def make_model_dir(directory: Path) -> Path:
    from moegpt.checkpoint.model_dir import save
    from moegpt.config import preset
    from moegpt.data.tokenizer import Tokenizer
    from moegpt.model import build_model

    tok = Tokenizer.train([TEXT], vocab_size=300)
    cfg = preset("tiny").replace(vocab_size=300, n_layers=2, d_model=64, n_heads=4, d_ff=64, n_experts=4,
                                 max_seq_len=CONTEXT)
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # sharper logits: sampled paths that differ clearly between seeds
    return save(model, tok, directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path  # the server's stdout and stderr
    model: str = "tiny-test"

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics, by name."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Metrics once nothing runs or waits and every KV block is free (or the last seen after timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["moegpt:num_requests_running"] == 0 and m["moegpt:num_requests_waiting"] == 0
                    and m["moegpt:kv_blocks_free"] == m["moegpt:kv_blocks_total"])
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


def start_server(model_dir: Path, *flags: str, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    log = model_dir.parent / f"server-{port}.log"
    cmd = [sys.executable, "-m", "moegpt", "serve", "--model", str(model_dir), "--served-model-name", "tiny-test",
           "--port", str(port), "--kv-cache-bytes", "1000000", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Server(f"http://127.0.0.1:{port}", proc, log)


def wait_ready(server: Server, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}: {server.log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")


def stop(server: Server) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve-model"))


HERE = Path(__file__).resolve().parent


def pytest_runtest_teardown(item, nextitem):
    """Stop the servers as soon as no serve test is left, not at the end of the whole session."""
    items = item.session.items
    rest = items[items.index(item) + 1:] if item in items else []
    if not any(HERE in Path(i.path).resolve().parents for i in rest):
        for server in item.session.config.stash.get(STARTED, []):
            stop(server)


STARTED = pytest.StashKey[list]()


@contextlib.contextmanager
def running(started: dict[str, Server]):
    """Wait until every server in ``started`` answers; stop them all on the way out."""
    try:
        for s in started.values():
            wait_ready(s)
        yield started
    finally:
        for s in started.values():
            stop(s)


@pytest.fixture(scope="session")
def servers(model_dir, pytestconfig):
    """Started together: 'main' (roomy queue), 'tight' (8 sequences a step; 8 sequences or 250 prompt tokens
    may wait: 429s under load),
    'drain' (for the SIGTERM test, which stops it)."""
    started = {
        "main": start_server(model_dir, "--max-num-seqs", "16", "--ngram"),
        "tight": start_server(model_dir, "--max-num-seqs", "8", "--max-queued-requests", "8",
                              "--max-queued-tokens", "250", "--max-batched-tokens", "64", "--kv-cache-bytes", "300000"),
        "drain": start_server(model_dir, "--shutdown-timeout", "60"),
    }
    pytestconfig.stash[STARTED] = list(started.values())
    with running(started):
        yield started


@pytest.fixture(scope="session")
def server(servers) -> Server:
    return servers["main"]


@pytest.fixture(scope="session")
def tight_server(servers) -> Server:
    return servers["tight"]


@pytest.fixture(scope="session")
def drain_server(servers) -> Server:
    return servers["drain"]
