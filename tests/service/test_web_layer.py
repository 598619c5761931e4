"""The shared HTTP layer (``bastion.web``) on its own, as another app (the LLM proxy)
would assemble it, over real HTTP: the role check before the body is read, one error
shape (or the app's own renderer), never a 500 for a client's mistake."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, StrictInt

from bastion.service.server import ServiceThread
from bastion.web.auth import ADMIN, READER, Authenticator, AuthMiddleware, RouteRules, require_role
from bastion.web.errors import ApiError, install_error_handlers
from bastion.web.keys import KeyStore

TOKEN = "web-layer-admin-token-0123456789abcdef"


class Body(BaseModel):
    n: StrictInt


def _openai_style(status, code, message, details, headers):
    return JSONResponse(status_code=status, headers=headers, content={
        "error": {"message": message, "type": "invalid_request_error", "param": None,
                  "code": code}})


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('web') / 'e.db'}"
    ks = KeyStore(url)
    reader, _ = ks.create("dash", "reader")
    app = FastAPI()
    app.state.auth = auth = Authenticator(ks, admin_token=TOKEN)
    seen: list[tuple[int, str]] = []
    install_error_handlers(app, render=_openai_style,
                           on_error=lambda req, status, code: seen.append((status, code)))
    app.add_middleware(AuthMiddleware, auth=auth, render=_openai_style,
                       on_refused=lambda status, code: seen.append((status, code)),
                       rules=RouteRules([("POST", "/admin/{thing}", ADMIN),
                                         ("GET", "/read", READER)]))

    @app.post("/admin/{thing}")
    def admin(thing: str, body: Body, ident=require_role("admin")) -> dict:
        if body.n < 0:
            raise ApiError(409, "negative", "n must not be negative")
        return {"thing": thing, "n": body.n, "who": ident.client}

    @app.get("/read")
    def read(ident=require_role("reader")) -> dict:
        return {"who": ident.client, "role": ident.role}

    @app.get("/public")
    def public() -> dict:
        return {"ok": True}

    with ServiceThread(app) as st, httpx.Client(base_url=st.url) as c:
        yield c, reader, seen
    ks.close()


def test_roles_before_the_body_and_one_error_shape(live):
    c, reader, seen = live
    adm = {"Authorization": f"Bearer {TOKEN}"}
    for body in (b"{not json", b'{"n": "1"}', b'{"n": true}'):
        r = c.post("/admin/x", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "missing_key"
        assert r.json()["error"]["type"] == "invalid_request_error"  # the app's renderer
        r = c.post("/admin/x", content=body, headers={"content-type": "application/json",
                                                       "X-API-Key": reader})
        assert r.status_code == 403
        r = c.post("/admin/x", content=body, headers={"content-type": "application/json",
                                                       **adm})
        assert r.status_code in (400, 422), r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert c.post("/admin/x", json={"n": 2}, headers=adm).json() == {
        "thing": "x", "n": 2, "who": "admin"}
    r = c.post("/admin/x", json={"n": -1}, headers=adm)
    assert r.status_code == 409 and r.json()["error"]["code"] == "negative"
    assert c.get("/read", headers={"Authorization": f"Bearer {reader}"}).json() == {
        "who": "dash", "role": "reader"}
    assert c.get("/read", headers={"Authorization": "Bearer bst_nope"}).status_code == 401
    assert c.get("/public").json() == {"ok": True}
    assert c.get("/nowhere").status_code == 404
    assert (409, "negative") in seen and any(s == 422 for s, _ in seen)
    assert (401, "missing_key") in seen and (403, "forbidden") in seen
