"""Property-based fuzzing of the service's OpenAPI document with schemathesis, through
real HTTP (uvicorn on 127.0.0.1), as an admin (so the deep routes are reached) and as
nobody (so the auth answers are checked too): no 5xx, every answer matches the
documented status codes, content types and schemas, and invalid data is refused."""

from __future__ import annotations

import os

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

ADMIN_TOKEN = "fuzz-admin-token-0123456789abcdef-0123"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]
#: cases per operation (11 operations x 2 identities: a few hundred per run)
EXAMPLES = int(os.environ.get("BASTION_FUZZ_EXAMPLES", "15"))


@pytest.fixture(scope="module")
def live(svc_models, svc_mlflow, tmp_path_factory, make_config):
    from bastion.service.app import create_app
    from bastion.service.server import ServiceThread

    m1, _ = svc_models
    d = tmp_path_factory.mktemp("svc-fuzz")
    cfg = make_config(m1, d / "events.db", svc_mlflow, model_name="svc-fuzz", max_batch=32,
                      admin_token=ADMIN_TOKEN, reload_interval_s=0)
    saved = os.environ.pop("BASTION_ADMIN_TOKEN", None)
    try:
        with ServiceThread(create_app(cfg)) as st:
            yield st
    finally:
        if saved is not None:
            os.environ["BASTION_ADMIN_TOKEN"] = saved


def _fuzz(url: str, mode: str, headers: dict[str, str], checks: list, examples: int
          ) -> dict[str, int]:
    """Fuzz every operation (``mode``: positive or negative data); the cases run per
    operation."""
    from hypothesis import given
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    ran: dict[str, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        ran[label] = 0

        def make(label: str, op: object) -> object:
            @given(case=op.as_strategy(  # type: ignore[attr-defined]
                generation_mode=GenerationMode(mode)))
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case: object) -> None:
                r = case.call_and_validate(  # type: ignore[attr-defined]
                    base_url=url, headers=headers, checks=checks)
                ran[label] += 1
                path = case.path  # type: ignore[attr-defined]
                if not headers and path not in ("/v1/health", "/dashboard", "/openapi.json"):
                    assert r.status_code in (401, 404, 405, 422), (label, r.status_code)

            return check

        run = make(label, op)
        try:
            run()  # type: ignore[operator]
        except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
            assert mode == "negative", label
            ran.pop(label)
    return ran


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_as_admin(live, mode):
    ran = _fuzz(live.url, mode, {"Authorization": f"Bearer {ADMIN_TOKEN}"}, CHECKS, EXAMPLES)
    assert len(ran) >= (10 if mode == "positive" else 6), ran
    assert sum(ran.values()) >= 5 * len(ran), ran
    assert any(k.startswith("POST /v1/predict") for k in ran)


def test_fuzz_without_a_key(live):
    ran = _fuzz(live.url, "positive", {}, CHECKS[:4], max(3, EXAMPLES // 3))
    assert sum(ran.values()) >= len(ran), ran


def test_fuzzing_left_the_service_healthy(live):
    h = httpx.get(f"{live.url}/v1/health", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert h.status_code == 200 and h.json()["status"] == "ok", h.text
    assert h.json()["last_error"] is None
