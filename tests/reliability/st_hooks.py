"""Schemathesis hooks for test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

``client_errors_say_what_was_wrong``: a 4xx answer must be JSON with a ``detail`` that names the
problem: for 422, a non-empty list of ``{loc, msg}`` where ``loc`` points into the request; for other
4xx, a non-empty message. ``status_tally`` only counts answers by status for RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import schemathesis


def _detail(response: Any) -> Any:
    try:
        doc = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} answer is not JSON: {response.content[:200]!r}") from None
    if not isinstance(doc, dict) or "detail" not in doc:
        raise AssertionError(f"{response.status_code} answer has no 'detail': {doc!r:.200}")
    return doc["detail"]


@schemathesis.check
def client_errors_say_what_was_wrong(ctx: Any, response: Any, case: Any) -> bool | None:
    code = response.status_code
    if not 400 <= code < 500:
        return None
    detail = _detail(response)
    if code == 422:
        if not isinstance(detail, list) or not detail:
            raise AssertionError(f"422 without a list of problems: {detail!r:.200}")
        for d in detail:
            ok = (isinstance(d, dict) and isinstance(d.get("loc"), list) and d["loc"]
                  and d["loc"][0] in ("body", "query", "path", "header") and isinstance(d.get("msg"), str)
                  and d["msg"].strip())
            if not ok:
                raise AssertionError(f"422 problem does not say where and what: {d!r:.200}")
    elif not (isinstance(detail, str) and detail.strip()):
        raise AssertionError(f"{code} with an empty or unreadable detail: {detail!r:.200}")
    return True


@schemathesis.check
class status_tally:  # noqa: N801 - the check's name as the CLI shows it
    """Counts answers per status code; writes them to $TT_REL_ST_STATS after the run."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def after_response(self, ctx: Any, response: Any, case: Any) -> None:
        self.counts[str(response.status_code)] += 1

    def after_run(self, ctx: Any) -> None:
        path = os.environ.get("TT_REL_ST_STATS")
        if path:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(dict(self.counts), f)
