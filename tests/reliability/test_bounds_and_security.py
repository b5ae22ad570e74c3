"""Bounds and security against a real server (and the code paths behind it).

Bounds: body size (413, with and without Content-Length), history length, k, exclusions, features
and batch size (422 naming the field), pathological JSON (400/422, never a 5xx).
Security: the admin token (401/403 unless exactly right, decided by a constant-time comparison),
checkpoints and resume states that carry pickled code are refused without running it, resuming
training cannot reach outside the artifacts root, Redis keys stay in the namespace.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.reliability.conftest import ADMIN_TOKEN
from tests.reliability.corrupt import pickled_checkpoint
from tests.reliability.harness import ServerProc

pytestmark = pytest.mark.slow  # one real server for the module (the session's shared one)

MAX_BODY, MAX_HISTORY, MAX_K, MAX_BATCH, MAX_EXCLUDE, MAX_FEATURES = 1_000_000, 200, 1000, 256, 1000, 64


@pytest.fixture(scope="module")
def client(shared_server: ServerProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared_server.url, timeout=30) as c:
        yield c


def _locs(r: httpx.Response) -> list[list[Any]]:
    return [d["loc"] for d in r.json()["detail"]]


# ---------------------------------------------------------------------------------------------
# bounds


def test_a_body_over_the_limit_is_413_with_or_without_content_length(client: httpx.Client) -> None:
    big = json.dumps({"history": ["x" * 1000] * (MAX_BODY // 1000 + 10)}).encode()
    r = client.post("/v1/recall", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and str(MAX_BODY) in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to trust
        for i in range(0, len(big), 64 * 1024):
            yield big[i:i + 64 * 1024]

    r = client.post("/v1/recall", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "TT_MAX_BODY_BYTES" in r.json()["detail"]
    # the server is fine afterwards
    assert client.post("/v1/recall", json={"user_id": 1, "k": 3}).status_code == 200


@pytest.mark.parametrize("path, body, ok_body, loc", [
    ("/v1/recall", {"history": [1] * (MAX_HISTORY + 1)}, {"history": [1] * MAX_HISTORY}, ["body", "history"]),
    ("/v1/recall", {"k": MAX_K + 1}, {"k": MAX_K}, ["body", "k"]),
    ("/v1/recall", {"k": 0}, {"k": 1}, ["body", "k"]),
    ("/v1/recall", {"k": 10**400}, {"k": 5}, ["body", "k"]),
    ("/v1/recall", {"exclude_ids": list(range(MAX_EXCLUDE + 1))}, {"exclude_ids": list(range(MAX_EXCLUDE))},
     ["body", "exclude_ids"]),
    ("/v1/recall", {"features": {f"f{i}": 1.0 for i in range(MAX_FEATURES + 1)}},
     {"features": {f"f{i}": 1.0 for i in range(MAX_FEATURES)}}, ["body", "features"]),
    ("/v1/recall/batch", {"requests": [{"user_id": 1, "k": 1}] * (MAX_BATCH + 1)},
     {"requests": [{"user_id": i % 200 + 1, "k": 5} for i in range(MAX_BATCH)]}, ["body", "requests"]),
    ("/v1/recall/batch", {"requests": []}, {"requests": [{"k": 1}]}, ["body", "requests"]),
])
def test_each_bound_is_422_naming_the_field_and_the_bound_itself_is_fine(
        client: httpx.Client, path: str, body: dict, ok_body: dict, loc: list[Any]) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text[:300]
    assert any(got[: len(loc)] == loc for got in _locs(r)), r.text[:300]
    ok = client.post(path, json=ok_body)
    assert ok.status_code == 200, ok.text[:300]


def test_similar_items_k_bound_and_unknown_item(client: httpx.Client) -> None:
    r = client.get(f"/v1/items/5/similar?k={MAX_K + 1}")
    assert r.status_code == 422 and ["query", "k"] in _locs(r)
    assert client.get("/v1/items/5/similar?k=3").status_code == 200
    r = client.get("/v1/items/999999/similar")
    assert r.status_code == 404 and "999999" in r.json()["detail"]


@pytest.mark.parametrize("raw", [
    b"[" * 200_000,  # deep nesting: a recursive parser would overflow its stack
    b'{"user_id": 1, "k": 5',  # truncated
    b'{"user_id": 1, "user_id": 2}' * 2,  # trailing garbage
    b"\xff\xfe\x00{",  # not UTF-8
    b'{"user_id": "\\ud800"}',  # a lone surrogate
    b'{"k": NaN}',
    b'{"history": [' + b"1e999," * 10 + b'1]}',
    b"",
])
def test_malformed_json_is_a_4xx_with_a_reason_never_a_5xx(client: httpx.Client, raw: bytes) -> None:
    r = client.post("/v1/recall", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.json()["detail"], r.text[:300]
    assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------
# admin token


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, 401),  # a prefix of the token
    ({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, 401),  # the token plus more
    ({"Authorization": f"Bearer {ADMIN_TOKEN.upper()}"}, 401),
    ({"Authorization": f"Basic {ADMIN_TOKEN}"}, 401),  # wrong scheme
    ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, 200),
])
def test_admin_reload_needs_exactly_the_token(client: httpx.Client, headers: dict, status: int) -> None:
    r = client.post("/v1/admin/reload", headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
        assert ADMIN_TOKEN not in r.text


def test_the_admin_token_is_decided_by_a_constant_time_comparison(trained, monkeypatch) -> None:
    """A plain == would leak the matching prefix length through timing, which no test over a network
    can measure reliably. So the test watches the decision instead: every admin request asks
    hmac.compare_digest (with both tokens as bytes) and is admitted exactly when it says so; a
    comparison of its own (==) would let the forged 'no' below through or the forged 'yes' fail."""
    import asyncio
    import hmac

    from service.routes import deps
    from tests.service.helpers import running, settings_for

    asked: list[tuple[bytes, bytes]] = []
    verdict: dict[str, bool | None] = {"forge": None}
    compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        asked.append((a, b))
        return compare(a, b) if verdict["forge"] is None else bool(verdict["forge"])

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)

    async def main() -> list[int]:
        codes = []
        async with running(settings_for(trained.path, "", "tt-rel-admin", admin_token=ADMIN_TOKEN)) as c:
            for token, forge in ((ADMIN_TOKEN, None), ("wrong", None), ("wrong", True), (ADMIN_TOKEN, False)):
                verdict["forge"] = forge
                r = await c.post("/v1/admin/reload", headers={"Authorization": f"Bearer {token}"})
                codes.append(r.status_code)
        return codes

    assert asyncio.run(main()) == [200, 401, 200, 401]
    assert len(asked) == 4 and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in asked)
    assert {a for a, _ in asked} == {ADMIN_TOKEN.encode(), b"wrong"} and {b for _, b in asked} == {ADMIN_TOKEN.encode()}


# ---------------------------------------------------------------------------------------------
# checkpoints and paths


def test_a_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path: Path) -> None:
    import torch

    from towers.checkpoint import CheckpointError, load_checkpoint

    marker = tmp_path / "code-ran"
    evil = tmp_path / "model.pt"
    pickled_checkpoint(evil, marker)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists(), "load_checkpoint ran code from the pickle"
    # the file really is hostile: the unsafe loader runs it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_resuming_from_a_last_pt_with_pickled_code_refuses_it_without_running_it(trained, tmp_path: Path) -> None:
    """The project loads three kinds of torch file: checkpoints (load_checkpoint, above), a bundle's
    model.pt while validating it (test_corrupt_bundles' pickled-code-checkpoint, in publish and in
    the server) and the training job's resume state, here. Each refuses pickled code unrun."""
    import shutil

    from towers.schema import DataError
    from training.config import TrainConfig
    from training.train import run

    art = tmp_path / "artifacts"
    (art / "models").mkdir(parents=True)
    mdir = art / "models" / trained.model_a
    shutil.copytree(trained.path / "models" / trained.model_a, mdir)
    marker = tmp_path / "code-ran"
    pickled_checkpoint(mdir / "last.pt", marker)
    with pytest.raises(DataError, match="cannot read resume state"):
        run(TrainConfig(artifacts=str(art), resume=trained.model_a, quiet=True, num_threads=1))
    assert not marker.exists(), "resuming ran code from the pickle"


@pytest.mark.parametrize("which", ["../../outside", "/tmp", "..", "../models"])
def test_training_resume_cannot_reach_outside_the_artifacts(tmp_path: Path, which: str) -> None:
    from towers.schema import DataError
    from training.train import resolve_resume_dir

    art = tmp_path / "a" / "b" / "artifacts"
    (art / "models").mkdir(parents=True)
    # each would be resumed (and written into) if it could be reached: models/../../outside is
    # a/b/outside, models/.. is the artifacts root itself
    for d in (tmp_path / "a" / "b" / "outside", tmp_path / "a" / "b" / "artifacts"):
        d.mkdir(parents=True, exist_ok=True)
        (d / "last.pt").write_bytes(b"")
    with pytest.raises(DataError):
        resolve_resume_dir(art, which)


# ---------------------------------------------------------------------------------------------
# redis namespace


def test_every_key_the_server_wrote_is_in_its_namespace(client: httpx.Client, shared_server: ServerProc) -> None:
    for u in range(1, 6):
        assert client.post("/v1/recall", json={"user_id": u, "k": 5}).status_code == 200
        assert client.post("/v1/events", json={"user_id": u, "item_id": u}).status_code == 200
    assert client.get("/v1/items/3/similar?k=3").status_code == 200
    r = shared_server.redis.client()  # type: ignore[attr-defined]
    try:
        keys = [k.decode() for k in r.scan_iter(count=1000)]
    finally:
        r.close()
    kinds = {k.split(":")[2] for k in keys if k.count(":") >= 3}
    assert {"rec", "events", "seen", "evseq"} <= kinds, kinds
    assert all(k.startswith(f"{shared_server.prefix}:v1:") for k in keys), \
        [k for k in keys if not k.startswith(shared_server.prefix)][:5]
