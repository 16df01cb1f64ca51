"""``torchrun -m moegpt serve --tp 2``: rank 0 serves the OpenAI API with one process's tokens and
per-expert counts in /metrics; SIGTERM drains the request in flight on every rank; a rank that dies
ends the server with a non-zero exit in bounded time."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from moegpt.infer.llm import LLM
from moegpt.infer.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from test_serving_parity import write_models  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def launch(model_dir: Path) -> tuple[subprocess.Popen, int]:
    """A TP2 server on a free port -> (torchrun's process, the port). A port taken between choosing
    and binding it (the ranks' own sockets open meanwhile) is retried with another."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONPATH": str(ROOT)}
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                 "-m", "moegpt", "serve", "--model", str(model_dir), "--tp", "2", "--port", str(port),
                                 "--dist-timeout", "30"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    return proc, port
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the sharded server did not come up")
        out = proc.stdout.read()
        if "address already in use" not in out:
            raise AssertionError(out)
    raise AssertionError("no free port in three tries")


def workers(proc: subprocess.Popen) -> list[int]:
    """The ranks' pids, by rank (torchrun's children, each with its RANK in its environment)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True)
    ranks = {}
    for pid, ppid in (map(int, line.split()) for line in out.stdout.splitlines() if line.strip()):
        if ppid != proc.pid:
            continue
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env and "LOCAL_RANK" in env:
            ranks[int(env["RANK"])] = pid
    return [ranks[r] for r in sorted(ranks)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models")) / "mqa"


def test_rank_0_serves_one_process_tokens_and_sigterm_drains_every_rank(model_dir):
    body = {"model": "mqa", "prompt": [5, 9, 13, 200, 7], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    want = LLM(model_dir).generate([body["prompt"]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    proc, port = launch(model_dir)
    try:
        status, got = post(port, body)
        assert status == 200, got
        assert got["choices"][0]["text"] == want[0].outputs[0].text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert "moegpt:expert_tokens" in r.read().decode()
        os.kill(workers(proc)[0], signal.SIGTERM)  # rank 0 (torchrun would signal every rank)
        proc.wait(timeout=60)
        out = proc.stdout.read()
        assert "draining" in out and proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_rank_that_dies_ends_the_server_with_an_error(model_dir):
    proc, _ = launch(model_dir)
    try:
        os.kill(workers(proc)[1], signal.SIGKILL)
        start = time.monotonic()
        proc.wait(timeout=60)
        assert proc.returncode != 0
        assert time.monotonic() - start < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
