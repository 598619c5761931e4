"""``bastion serve`` / ``bastion demo`` command registration and argument errors."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from bastion.cli.serve import register


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    register(app)
    return app


def test_commands_are_registered_with_their_options():
    r = CliRunner().invoke(_app(), ["serve", "--help"])
    assert r.exit_code == 0
    for opt in ("--model", "--reference", "--host", "--port", "--config"):
        assert opt in r.output
    r = CliRunner().invoke(_app(), ["demo", "--help"])
    assert r.exit_code == 0 and "--seed" in r.output and "--out" in r.output


def test_serve_without_model_is_a_clear_error():
    r = CliRunner().invoke(_app(), ["serve"])
    assert r.exit_code != 0
    assert "--model and --reference" in str(r.exception)


def test_config_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text('{"model": "x", "reference": "builtin:digits", "fpr": 2}')
    r = CliRunner().invoke(_app(), ["serve", "--config", str(bad)])
    assert r.exit_code != 0 and "fpr" in str(r.exception)
    r = CliRunner().invoke(_app(), ["serve", "--config", str(tmp_path / "missing.yaml")])
    assert "not found" in str(r.exception)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_process_tls_keys_and_short_admin_token(svc_models, svc_mlflow, tmp_path,
                                                      make_keys):
    """``bastion serve`` as a real process: a short admin token stops it with one line;
    with TLS and keys, HTTPS answers and a key is needed."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    m1, _ = svc_models
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    events = f"sqlite:///{tmp_path / 'events.db'}"
    port = _free_port()
    base = [sys.executable, "-m", "bastion.cli", "serve", "--model", str(m1), "--reference",
            "builtin:digits", "--events", events, "--tracking-uri", svc_mlflow,
            "--name", "svc-cli-tls", "--port", str(port), "--quiet"]
    env = {**os.environ, "BASTION_ADMIN_TOKEN": "too-short"}
    r = subprocess.run(base, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "at least 32" in lines[0] and "too-short" not in r.stderr
    tokens = make_keys(events, alice="client")
    env.pop("BASTION_ADMIN_TOKEN")
    proc = subprocess.Popen(base + ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"https://127.0.0.1:{port}"
        deadline = time.time() + 120
        import ssl

        ctx = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=url, verify=ctx, timeout=30) as c:
            while True:
                try:
                    h = c.get("/v1/health")
                    break
                except httpx.HTTPError:
                    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                    assert time.time() < deadline, "serve did not start"
                    time.sleep(0.5)
            assert h.status_code == 200 and h.json()["auth"] == "keys"
            body = {"inputs": [[0.0] * 64]}
            assert c.post("/v1/predict", json=body).status_code == 401
            r = c.post("/v1/predict", json=body,
                       headers={"Authorization": f"Bearer {tokens['alice']}"})
            assert r.status_code == 200 and r.json()["client_id"] == "alice"
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
