"""Broken bundles are never made current.

- publishing one (the reindex job's last step) is refused with a message naming the file and the
  fault; CURRENT, the published versions and the staging area are as before;
- one planted by hand as the CURRENT target (or a pointer that escapes the bundles directory) is
  refused by a running server under load, which keeps serving the previous bundle and stays ready;
- `twotower reindex` on bad input exits 2 with one clear line and publishes nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest

from index.bundle import BundleError, bundles_root, current_version, publish
from tests.reliability.conftest import ADMIN_TOKEN, Trained
from tests.reliability.corrupt import breakages, broken_copy, pickled_checkpoint
from tests.reliability.harness import REPO_ROOT, Load, ServerProc, wait_until
from tests.reliability.test_hot_swap import mixed

BROKEN_VERSION = "20990101T000000Z-0000aa"
NAMES = [b.name for b in breakages(Path("unused"))]


def _listing(artifacts: Path) -> list[str]:
    return sorted(p.name for p in bundles_root(artifacts).iterdir())


@pytest.mark.parametrize("name", NAMES)
def test_publish_refuses_a_broken_bundle_and_changes_nothing(artifacts: Path, trained: Trained, tmp_path: Path,
                                                             name: str) -> None:
    marker = tmp_path / "code-ran"
    b = {x.name: x for x in breakages(marker)}[name]
    root = bundles_root(artifacts)
    before = _listing(artifacts)
    staged = broken_copy(root / trained.first_bundle, root / f".staging-{BROKEN_VERSION}-abcdef", BROKEN_VERSION, b)
    with pytest.raises(BundleError) as err:
        publish(artifacts, staged)
    msg = str(err.value)
    assert all(w in msg for w in b.says), f"{name}: {msg!r} lacks {b.says}"
    assert current_version(artifacts) == trained.first_bundle
    assert _listing(artifacts) == before, "a refused bundle left something behind"
    assert not marker.exists(), "loading the bundle ran code from a pickle"


def _point(artifacts: Path, text: str) -> None:
    """Replace bundles/CURRENT atomically (as a careless operator with `mv` would)."""
    p = bundles_root(artifacts) / "CURRENT"
    tmp = p.with_name(".CURRENT.rel.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, p)


@pytest.mark.slow
def test_server_under_load_refuses_broken_current_bundles_and_keeps_serving(
        artifacts: Path, trained: Trained, tmp_path: Path, record_property) -> None:
    marker = tmp_path / "code-ran"
    good = trained.first_bundle
    root = bundles_root(artifacts)
    srv = ServerProc(artifacts, tmp_path / "server.log", redis_url="",
                     env={"TT_ADMIN_TOKEN": ADMIN_TOKEN, "TT_RELOAD_POLL_S": "0.1"})
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    refused: dict[str, str] = {}
    with srv, Load(srv.url, mixed, concurrency=6, max_requests=50_000, max_seconds=120) as load:
        load.wait_for(lambda ld: ld.ok >= 30, 20, "answers before the first fault")
        for n, b in enumerate(breakages(marker)):
            version = f"20990101T0000{n:02d}Z-0000aa"
            broken_copy(root / good, root / version, version, b)
            _point(artifacts, version)
            ready = wait_until(partial(_rejected, srv, version), 60, f"{b.name}: the server noticing {version}")
            assert ready["status"] == "ready" and ready["bundle"]["index_version"] == good, ready
            refused[b.name] = ready["last_bundle_error"]
            # refused for the right reason: the same words publish() must give for this breakage
            assert all(w in refused[b.name] for w in b.says), (b.name, refused[b.name], b.says)
            # an explicit reload says the bundle was refused, why, and what is still served
            r = httpx.post(f"{srv.url}/v1/admin/reload", headers=admin, timeout=30)
            assert r.status_code == 409, r.text
            assert version in r.json()["detail"] and f"still serving {good}" in r.json()["detail"], r.text

        # pointers that do not name a bundle directory inside bundles/
        for text in ("../../etc", "/etc", "..", f".staging-{good}", "no-such-version"):
            _point(artifacts, text)
            ready = wait_until(partial(_rejected, srv, text), 60, f"the server noticing CURRENT={text!r}")
            assert ready["status"] == "ready" and ready["bundle"]["index_version"] == good, ready
            refused[f"CURRENT={text}"] = ready["last_bundle_error"]
            why = "does not exist" if text == "no-such-version" else "not a version name"
            assert "bundle pointer" in refused[f"CURRENT={text}"] and why in refused[f"CURRENT={text}"], \
                refused[f"CURRENT={text}"]
        # asking for a named version outside the bundles directory
        for version in ("..", ".", "../models"):
            r = httpx.post(f"{srv.url}/v1/admin/reload", headers=admin, json={"index_version": version}, timeout=30)
            assert r.status_code in (404, 422), (version, r.status_code, r.text)
        _point(artifacts, good)
        n0 = load.ok
        load.wait_for(lambda ld: ld.ok >= n0 + 30, 20, "answers after the last fault")
        load.stop()
        final = srv.readyz()

    s = load.summary()
    record_property("load", s)
    print("broken bundles under load:", s)
    for k, v in refused.items():
        print(f"  refused {k}: {v[:160]}")
    assert final["status"] == "ready" and final["bundle"]["index_version"] == good
    assert load.errors() == {}, load.errors()
    assert load.pairs() == {(trained.model_a, good)}, load.pairs()
    assert not marker.exists(), "a planted checkpoint ran code in the server"


def _rejected(srv: ServerProc, needle: str) -> dict | None:
    doc = srv.readyz()
    err = doc.get("last_bundle_error") or ""
    return doc if needle in err else None


# ---------------------------------------------------------------------------------------------
# the reindex CLI


def _reindex_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from twotower.cli import main

    capsys.readouterr()
    rc = main(["--log-level", "WARNING", "reindex", *args, "--threads", "1", "--n-eval-users", "50",
               "--redis-url", ""])
    return rc, capsys.readouterr().err


@pytest.mark.slow
def test_reindex_cli_refuses_a_model_version_outside_the_artifacts(artifacts: Path, trained: Trained,
                                                                  tmp_path: Path) -> None:
    """A real `twotower reindex` process: exit 2, one line on stderr, nothing published, even though
    the path it was pointed at holds a perfectly good model."""
    shutil.copytree(artifacts / "models" / trained.model_a, tmp_path / "outside")
    before = _listing(artifacts)
    res = subprocess.run([sys.executable, "-m", "twotower.cli", "--log-level", "WARNING", "reindex",
                          "--artifacts", str(artifacts),
                          "--model-version", "../../outside", "--redis-url", "", "--threads", "1"],
                         capture_output=True, text=True, timeout=180, cwd=REPO_ROOT)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-1500:])
    assert len(lines) == 1 and lines[0].startswith("twotower reindex: error:"), res.stderr
    assert "model version" in lines[0] and "../../outside" in lines[0]
    assert _listing(artifacts) == before and current_version(artifacts) == trained.first_bundle


@pytest.mark.parametrize("case", ["truncated-model", "pickled-model", "bad-items-csv", "recall-gate",
                                  "absolute-model-version", "dotdot-model-version", "latest-escapes"])
def test_reindex_cli_bad_input_exits_2_with_a_clear_message(artifacts: Path, trained: Trained, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str], case: str) -> None:
    mdir = artifacts / "models" / trained.model_a
    marker = tmp_path / "code-ran"
    args = ["--artifacts", str(artifacts), "--model-version", trained.model_a]
    if case == "truncated-model":
        data = (mdir / "model.pt").read_bytes()
        (mdir / "model.pt").write_bytes(data[: len(data) // 3])
        says: tuple[str, ...] = ("model.pt", "not a loadable checkpoint")
    elif case == "pickled-model":
        pickled_checkpoint(mdir / "model.pt", marker)
        says = ("model.pt", "not a loadable checkpoint")
    elif case == "bad-items-csv":
        items = tmp_path / "new_items.csv"
        items.write_text("item_id,category,tags,price\n500,cat01,t001,3.5\nnot-a-number,cat02,t002,4.0\n")
        args += ["--items", str(items)]
        says = ("new_items.csv", "line 3", "not-a-number")
    elif case == "recall-gate":
        args += ["--factory", "IVF16,Flat", "--nprobe", "1", "--recall-floor", "1.0"]
        says = ("below the floor", "not publishing")
    elif case == "absolute-model-version":
        shutil.copytree(mdir, tmp_path / "elsewhere")
        args = ["--artifacts", str(artifacts), "--model-version", str(tmp_path / "elsewhere")]
        says = ("model version", "elsewhere")
    elif case == "dotdot-model-version":
        args = ["--artifacts", str(artifacts), "--model-version", ".."]
        says = ("model version", "'..'")
    else:
        shutil.copytree(mdir, tmp_path / "etc")
        (artifacts / "models" / "LATEST").write_text("../../etc\n")
        args = ["--artifacts", str(artifacts)]
        says = ("LATEST", "model version")
    before = _listing(artifacts)
    rc, err = _reindex_in_process(capsys, *args)
    line = [ln for ln in err.splitlines() if ln.startswith("twotower reindex: error:")]
    assert rc == 2, err
    assert len(line) == 1 and all(w in line[0] for w in says), (says, err)
    assert _listing(artifacts) == before and current_version(artifacts) == trained.first_bundle
    assert not marker.exists()
