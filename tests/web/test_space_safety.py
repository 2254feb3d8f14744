"""A public Space with anonymous visitors: the Behaviour and Provider check tabs live under the
audit's limits. The loopback Hub only; a provider endpoint on a closed 127.0.0.1 port, so a
request that should never be sent fails loudly instead of reaching anything."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import pytest

from lorafid.behaviour.report import BehaviourReport
from lorafid.providers.netguard import NetPolicy, ProbeServerSettings, VisitorBudget
from lorafid.providers.probe_report import ProbeReport
from lorafid.web.app import Dashboard
from lorafid.web.config import AppConfig
from lorafid.web.gallery import can_read
from lorafid.web.limits import TOO_MANY_LINKS, VisitorRate
from lorafid.web.links import resolve_commit
from lorafid.web.recent import Recent
from tests.hub_server import HubServer
from tests.llama_models import model_family, publish

CLOSED = "http://127.0.0.1:9/v1"  # discard port: nothing listens; a request sent would say "connection refused"


class _Request:
    """What a handler reads of a Gradio request."""

    def __init__(self, visitor: str = "127.0.0.1") -> None:
        self.headers: dict[str, str] = {}
        self.client = type("Client", (), {"host": visitor})()
        self.url = "http://127.0.0.1:7860/"


class _PublicRules(ProbeServerSettings):
    """The public endpoint rules, with a resolver that answers a public address without DNS."""

    def policy(self) -> NetPolicy:
        return NetPolicy.public(resolver=lambda host, port: ["8.8.8.8"])


@pytest.fixture
def models(hub: HubServer) -> dict[str, str]:
    family = model_family("llama", 2)
    return {
        "base": publish(hub, "org/base", family.base),
        "tuned": publish(hub, "org/tuned", family.full),
        "gated": publish(hub, "org/gated", family.full, gated=True),
    }


@pytest.fixture
def dashboard(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    yield _dashboard(hub, tmp_path)


def _dashboard(hub: HubServer, tmp_path: Path, **settings: Any) -> Any:
    config = AppConfig(
        endpoint=hub.endpoint, store_home=tmp_path / "home", examples_dir=tmp_path / "none", device="cpu", **settings
    )
    board = Dashboard(config)
    board.probe_settings = ProbeServerSettings(any_endpoint=True)  # lets the closed loopback port through
    board.build()
    return board


def _probe(board: Any, budget: float | None = None, **fields: Any) -> Any:
    values = {"endpoint": CLOSED, "model": "m", "key": "", "base": "org/base", "finetune": "org/tuned"} | fields
    return board.run_probe(*values.values(), "16", "auto", budget, [], request=_Request())


# -- 5: every check under the same limits, before the first request to anyone ----------------------


def test_the_probe_takes_the_budget_before_reading_anything(dashboard: Any, hub: HubServer, models: Any) -> None:
    dashboard.probe_budget = VisitorBudget(10)  # less than the most a check may send (50)
    hub.requests.clear()
    with pytest.raises(gr.Error, match="you have 10 of 10 left this hour"):
        next(_probe(dashboard))
    assert hub.requests == []  # no tokenizer, no header: nothing was fetched


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"max_model_bytes": 10_000}, "above this server's limit"),
        ({"max_tensors": 5}, "tensors, above this server's limit of 5"),
        ({"max_tensor_bytes": 1_000}, "per-tensor limit"),
    ],
)
def test_the_probe_checks_the_models_limits_before_the_tokenizer_or_the_provider(
    hub: HubServer, models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: dict, said: str
) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    board = _dashboard(hub, tmp_path, **settings)
    hub.requests.clear()
    with pytest.raises(gr.Error, match=said):  # not "connection refused": nothing was sent to the provider
        next(_probe(board, budget=5))
    assert not any("tokenizer" in r.path for r in hub.requests)
    board.probe_budget.take("127.0.0.1", 300)  # the reservation was given back whole: 300 are left


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"max_tensor_bytes": 1_000}, "per-tensor limit"),
        ({"max_tensors": 5}, "tensors, above this server's limit of 5"),
        ({"max_audit_minutes": 1e-9}, "LORAFID_MAX_AUDIT_MINUTES"),
    ],
)
def test_the_behaviour_check_runs_under_the_servers_limits(
    hub: HubServer, models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: dict, said: str
) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    board = _dashboard(hub, tmp_path, **settings)
    with pytest.raises(gr.Error, match=said):
        list(board.run_behaviour("org/base", "org/tuned", "4", "lora-only", False, request=_Request()))


def test_a_behaviour_check_takes_one_of_the_visitors_slots(dashboard: Any, hub: HubServer, models: Any) -> None:
    visitor = "127.0.0.1"
    assert dashboard.visitors.take(visitor)  # an audit of this visitor is running
    hub.requests.clear()
    try:
        with pytest.raises(gr.Error, match="already have 1 audit"):
            list(dashboard.run_behaviour("org/base", "org/tuned", "4", "lora-only", False, request=_Request()))
    finally:
        dashboard.visitors.give_back(visitor)
    assert hub.requests == []


def test_the_checks_keep_their_directions_under_the_stores_home_unless_turned_off(
    hub: HubServer, models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second check of a pair on the server decomposes nothing; the entries live under the store's
    home (bounded by LORAFID_DIRECTION_CACHE_GB), and 0 writes none."""
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "elsewhere"))
    board = _dashboard(hub, tmp_path)
    list(board.run_behaviour("org/base", "org/tuned", "4", "lora-only", False, request=_Request()))
    assert list((tmp_path / "home" / "directions").glob("*.safetensors"))
    assert not (tmp_path / "elsewhere").exists()
    off = _dashboard(hub, tmp_path / "off", direction_cache_gb=0)
    list(off.run_behaviour("org/base", "org/tuned", "4", "lora-only", False, request=_Request()))
    assert not (tmp_path / "off" / "home" / "directions").exists()


# -- 6: no server login for anonymous visitors; stored checks under the audit's visibility rule ----


def test_with_the_server_token_an_anonymous_check_still_sends_no_token(
    hub: HubServer, models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_TOKEN", "hf_server_login")  # the server's own login, which reads the gated repo
    # The model-size limit stops a check that could read the repo before it sends anything to a provider.
    board = _dashboard(hub, tmp_path, server_token=True, max_model_bytes=10_000)
    board.probe_settings = _PublicRules()  # a public server: the Hub login question is the public one
    hub.requests.clear()
    with pytest.raises(gr.Error, match="gated"):
        list(board.run_behaviour("org/base", "org/gated", "4", "lora-only", False, request=_Request()))
    with pytest.raises(gr.Error, match="gated"):
        next(_probe(board, budget=5, finetune="org/gated", endpoint="https://provider.invalid/v1"))
    assert hub.requests and not any(r.has_authorization for r in hub.requests)


@pytest.mark.parametrize("kind", ["behaviour", "probe"])
def test_a_stored_check_of_a_gated_repo_opens_only_for_who_can_read_it(
    dashboard: Any, hub: HubServer, models: Any, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    status = {"behaviour": dashboard.behave_status, "probe": dashboard.probe_status}[kind]
    shown = {"behaviour": dashboard.behave_plot, "probe": dashboard.probe_verdict}[kind]
    monkeypatch.setattr(dashboard, "_behaviour_view", lambda document: {shown: "SHOWN"})
    monkeypatch.setattr(dashboard, "_probe_view", lambda document: {shown: "SHOWN"})
    opened = dashboard.open_behaviour_link if kind == "behaviour" else dashboard.open_probe_link

    def document(finetune: str, sha: str) -> dict[str, Any]:
        sides = {
            "base": ("org/base", models["base"]),
            "finetune": (finetune, sha),
        }
        if kind == "behaviour":
            return BehaviourReport(
                "complete",
                "",
                *({"spec": r, "kind": "hub", "repo_id": r, "resolved_sha": h} for r, h in sides.values()),
                {},
                {},
                {},
                [],
                None,
                "",
                {},
            ).to_dict()
        return ProbeReport(
            "complete",
            "provider.example",
            "m",
            "completions-echo",
            [],
            *({"spec": r, "repo_id": r, "revision": None, "sha": h} for r, h in sides.values()),
            {},
            {},
            {},
            {},
            None,
            [],
            {},
        ).to_dict()

    gated = document("org/gated", models["gated"])
    key = dashboard.store.put_document(kind, gated)
    dashboard.catalog.record_document(kind, key, gated, anonymous=False)  # run with a visitor's sign-in
    anonymous = opened(f"?{kind}={key}", _Request())
    assert shown not in anonymous and "gated or private" in anonymous[status]
    reader = gr.OAuthToken(token="hf_reader", scope="", expires_at=0)
    assert opened(f"?{kind}={key}", _Request(), reader)[shown] == "SHOWN"
    public = document("org/tuned", models["tuned"])
    key = dashboard.store.put_document(kind, public)
    dashboard.catalog.record_document(kind, key, public, anonymous=True)
    assert opened(f"?{kind}={key}", _Request())[shown] == "SHOWN"


# -- 11: no uploads at all -------------------------------------------------------------------------


def test_uploads_are_refused_whatever_their_size(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.web.test_app import serve

    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    config = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "home", examples_dir=tmp_path, device="cpu")
    with serve(config) as url:
        for size in (0, 1, 900):
            answer = httpx.post(url + "gradio_api/upload", files={"files": ("f.txt", b"x" * size)}, timeout=30)
            assert answer.status_code == 403 and "takes no uploads" in answer.text
        assert httpx.get(url, timeout=30).status_code == 200  # the page itself is served


# -- 14: permalinks: Hub answers kept briefly, link opens rate-limited per visitor -----------------


def test_hub_answers_asked_without_a_token_are_kept_a_minute(hub: HubServer, models: Any) -> None:
    from lorafid.audit.report import SourceRecord

    hub.requests.clear()
    assert resolve_commit("org/tuned", None, False, hub.endpoint) == models["tuned"]
    once = len(hub.requests)
    for _ in range(4):
        assert resolve_commit("org/tuned", None, False, hub.endpoint) == models["tuned"]
    assert once > 0 and len(hub.requests) == once  # asked once, not five times
    resolve_commit("org/tuned", None, "hf_own_token", hub.endpoint)  # a visitor's own token: asked each time
    assert len(hub.requests) > once
    record = SourceRecord("org/gated", "hub", "org/gated", None, models["gated"], None, ())
    hub.requests.clear()
    assert not can_read(record, False, hub.endpoint)
    asked = len(hub.requests)
    assert [can_read(record, False, hub.endpoint) for _ in range(4)] == [False] * 4
    assert asked > 0 and len(hub.requests) == asked
    assert can_read(record, "hf_reader", hub.endpoint) and len(hub.requests) > asked


def test_recent_keeps_answers_for_its_time_and_never_errors() -> None:
    now = [0.0]
    recent: Recent[int] = Recent(60.0, size=2, clock=lambda: now[0])
    calls: list[str] = []

    def compute(key: str) -> int:
        calls.append(key)
        return len(calls)

    assert recent.get("a", lambda: compute("a")) == recent.get("a", lambda: compute("a")) == 1
    now[0] = 61.0
    assert recent.get("a", lambda: compute("a")) == 2  # expired: asked again
    with pytest.raises(ZeroDivisionError):
        recent.get("b", lambda: 1 // 0)
    assert recent.get("b", lambda: compute("b")) == 3  # the error was not kept


def test_link_opens_are_rate_limited_per_visitor(dashboard: Any) -> None:
    rate = VisitorRate(per_window=3, window_s=60.0, clock=lambda: 0.0)
    assert [rate.allow("a") for _ in range(4)] == [True, True, True, False]
    assert rate.allow("b")  # another visitor has their own allowance
    dashboard.link_rate = VisitorRate(per_window=2, window_s=60.0)
    query = "?behaviour=0123456789abcdef"
    answers = [dashboard.open_behaviour_link(query, _Request("10.0.0.1")) for _ in range(3)]
    assert [a[dashboard.behave_status] == TOO_MANY_LINKS for a in answers] == [False, False, True]
    assert dashboard.open_probe_link("?probe=0123456789abcdef", _Request("10.0.0.2"))[dashboard.probe_status] != (
        TOO_MANY_LINKS
    )
    link = dashboard.open_link("?base=org%2Fbase&finetune=org%2Ftuned", 8, "mse", None, _Request("10.0.0.1"))
    assert link[dashboard.progress] == TOO_MANY_LINKS  # a weight-audit link counts toward the same allowance


# -- 15: a server-wide cap on provider requests --------------------------------------------------


def test_the_server_caps_provider_requests_for_all_visitors_together() -> None:
    budget = VisitorBudget(60, 3600, clock=lambda: 0.0, server_max_requests=100)
    budget.take("a", 60)
    budget.take("b", 40)
    with pytest.raises(Exception, match="This server has sent its 100 provider requests for this hour"):
        budget.take("c", 1)
    budget.give_back("b", 10)  # b's check needed 30 of its 40
    budget.take("c", 10)
    with pytest.raises(Exception, match="you have 0 of 60 left"):
        budget.take("a", 1)


def test_the_server_cap_comes_from_the_environment() -> None:
    assert ProbeServerSettings.from_env({}).server_requests_per_hour == 3_000
    settings = ProbeServerSettings.from_env({"LORAFID_PROBE_SERVER_REQUESTS_PER_HOUR": "500"})
    assert settings.budget().server_max_requests == 500
    with pytest.raises(Exception, match="LORAFID_PROBE_SERVER_REQUESTS_PER_HOUR='lots'"):
        ProbeServerSettings.from_env({"LORAFID_PROBE_SERVER_REQUESTS_PER_HOUR": "lots"})


def test_the_dashboard_uses_the_server_wide_cap(dashboard: Any) -> None:
    assert dashboard.probe_budget.server_max_requests == dashboard.probe_settings.server_requests_per_hour
