"""Starts `qnext serve` on a free loopback port with the qwen-vocab fixture (random weights,
real Qwen tokenizer and chat template) for the openai-client tests, or with the bundled trained
model (models/qnext-tiny) where answers must be right.

The binary is $QNEXT_BIN, else target/debug/qnext, else target/release/qnext."""

import os
import pathlib
import socket
import subprocess
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "qwen-vocab"
THINKING_TEMPLATE = ROOT / "tests" / "fixtures" / "chat_templates" / "tokenizer_config.thinking.json"
API_KEY = "sk-python-test"
MODEL = "qwen-test"
MAX_MODEL_LEN = 2048


def qnext_binary() -> pathlib.Path:
    env = os.environ.get("QNEXT_BIN")
    if env:
        return pathlib.Path(env)
    for profile in ("debug", "release"):
        p = ROOT / "target" / profile / "qnext"
        if p.exists():
            return p
    raise RuntimeError("no qnext binary: run `cargo build` or set QNEXT_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *extra: str, model: pathlib.Path | None = FIXTURE, port: int | None = None,
                 api_key: bool = True):
        self.port = port or free_port()
        args = [
            str(qnext_binary()), "serve", *([str(model)] if model else []),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--served-model-name", MODEL, *(["--api-key", API_KEY] if api_key else []),
            "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "4", *extra,
        ]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        self.log = []
        deadline = time.time() + 60
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"qnext serve exited: {''.join(self.log)}")
            self.log.append(line)
            if "listening on" in line:
                break
            if time.time() > deadline:
                raise RuntimeError("qnext serve did not start in 60 s")
        # Keep reading stderr so the server never blocks on a full pipe.
        threading.Thread(target=lambda: [self.log.append(l) for l in self.proc.stderr], daemon=True).start()
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()
    assert s.proc.returncode == 0, "".join(s.log)


@pytest.fixture(scope="session")
def thinking_server():
    s = Server("--chat-template", str(THINKING_TEMPLATE), "--reasoning-parser", "deepseek_r1")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def tiny_server():
    """The bundled trained model, found without naming it, as a user starts it."""
    s = Server("--reasoning-parser", "deepseek_r1", "--tool-call-parser", "hermes", model=None)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def tiny_client(tiny_server):
    import openai

    return openai.OpenAI(base_url=tiny_server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
