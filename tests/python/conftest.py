"""Start one real wshd for the whole pytest session.

Env: WSHD_BIN (default target/debug/wshd) and WSHD_TARGET_DIR (default
target/debug), relative paths taken from the repository root.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HANDLERS = ("libecho_wsh.so", "libchat_wsh.so", "liborigin_check_wsh.so")
MAX_MESSAGE_SIZE = 1024 * 1024
ALLOWED_ORIGIN = "http://allowed.example"
DOC_FILE_BODY = b"hello from the doc root\n"
DOC_HTML_BODY = b"<!DOCTYPE html><title>t</title><p>page</p>\n"


def config_toml(allowed_origins=(ALLOWED_ORIGIN,), subprotocols=("chat.v2", "chat.v1")) -> str:
    """The config file text: the one place to follow the server's config format."""

    def toml_list(xs):
        return "[" + ", ".join('"' + x + '"' for x in xs) + "]"

    return "\n".join(
        [
            "[limits]",
            'max_message_size = "1MiB"',
            "",
            "[[route]]",
            'path = "/origin_check"',
            'handler = "origin_check"',
            "[route.config]",
            f"allowed_origins = {toml_list(allowed_origins)}",
            f"subprotocols = {toml_list(subprotocols)}",
            "",
            # The echo handler again, with permessage-deflate.
            "[[route]]",
            'path = "/echo_deflate"',
            'handler = "echo"',
            'compression = "on"',
            "",
            # The chat handler with permessage-deflate: a room is a topic, so
            # members of one room on /chat and /chat_deflate share a publish.
            "[[route]]",
            'path = "/chat_deflate"',
            'handler = "chat"',
            'compression = "on"',
            "",
        ]
    )


def _from_root(p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else REPO_ROOT / path


@dataclass
class Wshd:
    host: str
    port: int
    tmp: Path
    log_path: Path

    def ws_url(self, route: str) -> str:
        return f"ws://{self.host}:{self.port}{route}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


_children: list[subprocess.Popen] = []


@atexit.register
def _kill_leftovers() -> None:
    for child in _children:
        if child.poll() is None:
            child.kill()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def wshd():
    bin_path = _from_root(os.environ.get("WSHD_BIN", "target/debug/wshd"))
    target_dir = _from_root(os.environ.get("WSHD_TARGET_DIR", "target/debug"))
    if not bin_path.exists():
        pytest.fail(f"wshd binary not found: {bin_path} (build it, or set WSHD_BIN)", pytrace=False)

    tmp = Path(tempfile.mkdtemp(prefix="wshd-py-"))
    proc = None
    try:
        handler_dir = tmp / "handlers"
        handler_dir.mkdir()
        for so in HANDLERS:
            src = target_dir / so
            if not src.exists():
                pytest.fail(f"handler not found: {src} (build the handlers, or set WSHD_TARGET_DIR)", pytrace=False)
            shutil.copy2(src, handler_dir / so)
        doc_root = tmp / "www"
        doc_root.mkdir()
        (doc_root / "hello.txt").write_bytes(DOC_FILE_BODY)
        (doc_root / "page.html").write_bytes(DOC_HTML_BODY)
        (doc_root / "sub").mkdir()
        (doc_root / "escape.toml").symlink_to(tmp / "wshd.toml")  # leaves the root
        config = tmp / "wshd.toml"
        config.write_text(config_toml())
        addr_file = tmp / "addr"
        log_path = tmp / "wshd.log"

        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    str(bin_path), "-H", "127.0.0.1", "-p", "0",
                    "-w", str(handler_dir), "-d", str(doc_root),
                    "--config", str(config), "--addr-file", str(addr_file),
                    "--log-level", "info",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        _children.append(proc)

        host, port = _wait_listening(proc, addr_file, log_path, "wshd")
        server = Wshd(host=host.strip("[]"), port=port, tmp=tmp, log_path=log_path)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
            if os.environ.get("WSHD_TEST_VERBOSE"):
                print((tmp / "wshd.log").read_text(errors="replace"))
        shutil.rmtree(tmp, ignore_errors=True)


def launch_wshd(tmp: Path, handlers: Path, *extra: str) -> tuple[subprocess.Popen, str, int, Path]:
    """Starts wshd on 127.0.0.1, port 0, serving `handlers` with `extra`
    flags, its address file and log in `tmp`; waits until it listens.
    Returns (process, host, port, log path); stop it with `_stop`."""
    bin_path = _from_root(os.environ.get("WSHD_BIN", "target/debug/wshd"))
    if not bin_path.exists():
        pytest.fail(f"wshd binary not found: {bin_path} (build it, or set WSHD_BIN)", pytrace=False)
    addr_file, log_path = tmp / "addr", tmp / "wshd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(bin_path), "-H", "127.0.0.1", "-p", "0", "-w", str(handlers),
             "--addr-file", str(addr_file), "--log-level", "info", *extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    _children.append(proc)
    host, port = _wait_listening(proc, addr_file, log_path, "wshd")
    return proc, host, port, log_path


def _wait_listening(proc, addr_file: Path, log_path: Path, what: str) -> tuple[str, int]:
    """Waits (at most 30 s) for the address file wshd writes once it
    listens; a complete one ends with a newline. Returns (host, port)."""
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} before listening:\n{log_path.read_text(errors='replace')}",
                        pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"{what} wrote no {addr_file} within 30 s:\n{log_path.read_text(errors='replace')}",
                        pytrace=False)
        try:
            text = addr_file.read_text()
            if text.endswith("\n"):
                host, _, port = text.strip().rpartition(":")
                return host, int(port)
        except FileNotFoundError:
            pass
        time.sleep(0.02)


def make_cert(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, made now with
    the openssl CLI; clients trust it as their only CA."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return cert, key


@dataclass
class WshdTls:
    host: str
    port: int
    cert: Path

    def wss_url(self, route: str) -> str:
        # The certificate names localhost: connect by that name.
        return f"wss://localhost:{self.port}{route}"


@pytest.fixture(scope="session")
def wshd_tls():
    """A second wshd serving wss:// with a certificate made at test time."""
    bin_path = _from_root(os.environ.get("WSHD_BIN", "target/debug/wshd"))
    target_dir = _from_root(os.environ.get("WSHD_TARGET_DIR", "target/debug"))
    if not bin_path.exists():
        pytest.fail(f"wshd binary not found: {bin_path} (build it, or set WSHD_BIN)", pytrace=False)
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make the test certificate: apt-get install openssl", pytrace=False)
    tmp = Path(tempfile.mkdtemp(prefix="wshd-py-tls-"))
    proc = None
    try:
        handler_dir = tmp / "handlers"
        handler_dir.mkdir()
        shutil.copy2(target_dir / "libecho_wsh.so", handler_dir / "libecho_wsh.so")
        cert, key = make_cert(tmp)
        addr_file, log_path = tmp / "addr", tmp / "wshd.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    str(bin_path), "-H", "127.0.0.1", "-p", "0", "-w", str(handler_dir),
                    "--tls-cert", str(cert), "--tls-key", str(key), "--addr-file", str(addr_file),
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        _children.append(proc)
        host, port = _wait_listening(proc, addr_file, log_path, "wshd (TLS)")
        yield WshdTls(host=host, port=port, cert=cert)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def pywebsocket3_example() -> Path:
    """pywebsocket3's example/ directory, from its sdist (run.sh unpacks it
    and sets PYWEBSOCKET3_EXAMPLE): echo_client.py lives there."""
    default = Path(__file__).resolve().parent / ".venv/pywebsocket3-sdist/pywebsocket3-4.0.2/example"
    example = Path(os.environ.get("PYWEBSOCKET3_EXAMPLE", default))
    if not (example / "echo_client.py").exists():
        pytest.fail(f"no echo_client.py in {example}: run tests/python/run.sh, which unpacks the "
                    "pywebsocket3 sdist", pytrace=False)
    return example
