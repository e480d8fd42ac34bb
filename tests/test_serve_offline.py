"""What a new user meets when talking to a real `reasonguard serve` (tiny-llama, uvicorn on
127.0.0.1): a form body is named as such (415, with the content type to send), a second `serve`
on a busy port stops before loading anything (exit 2, naming host:port), and `/docs` renders
offline: a plain page that links `/openapi.json`, with no script from a CDN.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from test_serve import AUTH, Server, _stop_clean, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    main = start_server(tmp_path_factory.mktemp("serve_offline"), "main", "--max-new-tokens", "2")
    try:
        main.wait_ready()
        yield main
    finally:
        _stop_clean(main)


def test_a_form_body_says_what_was_sent_and_what_to_send(server: Server) -> None:
    r = httpx.post(f"{server.url}/v1/moderations", data={"input": "hi"}, headers=AUTH)
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert error["code"] == "unsupported_media_type"
    assert error["message"] == (
        "the request body must be JSON sent with 'Content-Type: application/json'; got a form "
        "body ('Content-Type: application/x-www-form-urlencoded'). With curl, add -H "
        "'Content-Type: application/json'"
    )
    # JSON text under another content type is refused the same way, naming that type.
    plain = {**AUTH, "Content-Type": "text/plain"}
    r = httpx.post(f"{server.url}/v1/classify", content=b'{"items": []}', headers=plain)
    assert r.status_code == 415 and "got a body ('Content-Type: text/plain')" in r.text
    # The same request as JSON is answered.
    r = httpx.post(f"{server.url}/v1/moderations", json={"input": "hi"}, headers=AUTH)
    assert r.status_code == 200, r.text


def test_docs_renders_offline_and_points_at_the_schema(server: Server) -> None:
    r = httpx.get(f"{server.url}/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<a href='/openapi.json'>/openapi.json</a>" in page
    # Nothing to fetch from elsewhere: no script, no stylesheet, no outside address.
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert "http://" not in page and "https://" not in page
    for endpoint in ("POST /v1/moderations", "POST /v1/classify", "GET /health", "WS /v1/stream"):
        assert endpoint in page
    schema = httpx.get(f"{server.url}/openapi.json")
    assert schema.status_code == 200 and "/v1/classify" in schema.json()["paths"]
    assert httpx.get(f"{server.url}/redoc").status_code == 404


def test_a_second_serve_on_a_busy_port_stops_before_loading(server: Server, tmp_path: Path) -> None:
    port = server.url.rsplit(":", 1)[1]
    # A model that does not exist: were it looked at first, the error would be about the model.
    missing = tmp_path / "no-model-here"
    command = [sys.executable, "-m", "reasonguard", "serve", "--model", str(missing)]
    done = subprocess.run(
        [*command, "--port", port],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "another server (a second `reasonguard serve`?) is listening there" in done.stderr
    assert "Traceback" not in done.stderr and str(missing) not in done.stderr
    # The first server is unaffected.
    assert httpx.get(f"{server.url}/health").status_code == 200
