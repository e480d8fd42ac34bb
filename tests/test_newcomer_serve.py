"""The server documents its request bodies and says plainly what is wrong with a bad one: an
empty `input` list, a body that is not JSON. Errors keep status 422 and OpenAI's error shape."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from reasonguard.serve.app import ServeSettings, create_app
from test_serve_app import AUTH, KEY, FakeGuard

JSON = {**AUTH, "Content-Type": "application/json"}


@pytest.fixture
def guard() -> FakeGuard:
    return FakeGuard()


@pytest.fixture
def client(guard: FakeGuard) -> Iterator[TestClient]:
    with TestClient(create_app(guard, ServeSettings(model_name="fake", api_key=KEY))) as c:
        yield c


def _error(client: TestClient, path: str, raw: bytes) -> str:
    r = client.post(path, content=raw, headers=JSON)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"]["code"] == "invalid_body"
    assert body["error"]["type"] == "invalid_request_error" and body["detail"]
    return body["error"]["message"]


def test_classify_request_body_is_documented(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    request, item = schemas["ClassifyRequest"], schemas["ClassifyItem"]
    for name in ("items", "reasoning", "model"):
        assert request["properties"][name].get("description"), name
    for name in ("prompt", "response"):
        assert item["properties"][name].get("description"), name
    reasoning = request["properties"]["reasoning"]
    assert {"auto", "always", "never"} <= {
        v for option in reasoning["anyOf"] for v in option.get("enum", [])
    }
    assert request["required"] == ["items"] and item["required"] == ["prompt"]
    # A worked example a user can paste, and it is a valid request.
    [example, *_] = request["examples"]
    assert example["items"][0]["prompt"] and "response" in example["items"][0]
    r = client.post("/v1/classify", json=example, headers=AUTH)
    assert r.status_code == 200, r.text
    moderation = schemas["ModerationRequest"]
    for example in moderation["examples"]:
        assert client.post("/v1/moderations", json=example, headers=AUTH).status_code == 200


def test_empty_input_list_says_what_is_wrong(client: TestClient, guard: FakeGuard) -> None:
    message = _error(client, "/v1/moderations", b'{"input": []}')
    assert message == (
        "body.input: an empty list; give a string, a non-empty list of strings, or a list of "
        'text parts ({"type": "text", "text": ...})'
    )
    assert guard.calls == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"input": 3}', "body.input: a number; give a string, a non-empty list of strings"),
        (b'{"input": null}', "body.input: null; give a string"),
        (b'{"input": ["a", 3]}', "body.input.1: Input should be a valid string"),
        (b'{"input": ["a", " "]}', "body.input.1: must contain a non-space character"),
        (b'{"input": [{"type": "image_url"}]}', "body.input.0.type: Input should be 'text'"),
        (b'{"input": [{"type": "text", "text": "a"}, "b"]}', "body.input: a list that mixes"),
        (b'{"input": " "}', "body.input: must contain a non-space character"),
    ],
)
def test_other_bad_inputs_name_the_part_that_is_wrong(
    client: TestClient, raw: bytes, message: str
) -> None:
    assert _error(client, "/v1/moderations", raw).startswith(message)


def test_empty_items_list_says_what_is_wrong(client: TestClient) -> None:
    message = _error(client, "/v1/classify", b'{"items": []}')
    assert message.startswith("body.items: an empty list; give at least one item")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            b'{"input": "x",',
            "the request body is not valid JSON: expecting property name enclosed in double "
            "quotes at character 14",
        ),
        (b'{"input": tru}', "the request body is not valid JSON: expecting value at character 10"),
        (
            b'{\n  "input": "x",\n  oops\n}',
            "the request body is not valid JSON: expecting property name enclosed in double "
            "quotes at character 20 (line 3, column 3)",
        ),
    ],
)
def test_malformed_json_says_the_body_is_not_json(
    client: TestClient, raw: bytes, message: str
) -> None:
    assert _error(client, "/v1/moderations", raw) == message


def test_a_body_that_is_not_an_object_says_so(client: TestClient) -> None:
    assert _error(client, "/v1/moderations", b"[]").startswith(
        "the request body must be a JSON object"
    )
    r = client.post("/v1/classify", headers=AUTH)  # no body at all
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith("the request body is empty")
