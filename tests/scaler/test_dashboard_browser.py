"""The live dashboard in a real browser, against whole `scaler run` processes with real workers.

Headless Chromium (Debian's package, /usr/bin/chromium) driven by Playwright with
``executable_path`` (no browser download), against `scaler run --backend local` on the session's
Redis and PostgreSQL with real Celery workers: the page loads without console errors, a burst shows
on io's chart and its replica count rises on the page, a pin from the page needs the token and then
changes the replicas, the event feed shows the drain, and a standby's page says it is read-only.

A screenshot is saved to build/test-artifacts/ when a step fails; one taken during the burst goes to
$DASHBOARD_SCREENSHOT when set (`make dashboard-screenshot` writes docs/img/dashboard.png).
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from scaler_runs import ScalerRun, start_scaler_run, stop_workers
from scaler_support import local_policy, migrate, service_app, worker_env
from support.polling import poll_until

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
TOKEN = "dash-" + "k" * 27
BURST = 60

POLICY = yaml.safe_dump(
    local_policy(
        {"io": ["io_intensive"], "calm": ["default"]},
        up={"stabilization_s": 0, "cooldown_s": 0.5, "max_step": 2},
        down={"stabilization_s": 1, "cooldown_s": 0.5, "max_step": 3},
    )
)

if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def env(redis_url: str, database_url: str, key_prefix: str) -> Iterator[dict[str, str]]:
    migrate(database_url)
    prefix = f"{key_prefix}db{uuid.uuid4().hex[:6]}:"
    yield {
        **worker_env(redis_url, database_url, prefix),
        "SCALER_KEY_PREFIX": prefix,
        "SCALER_LEASE_S": "2",
        "SCALER_TOKEN": TOKEN,
    }
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.console_problems = problems  # type: ignore[attr-defined]
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:  # the call phase has been reported by now
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / f"{request.node.name}.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of the failing page: {shot}")
    context.close()


@pytest.fixture
def scalers(tmp_path: Path) -> Iterator[tuple[list[ScalerRun], Path]]:
    runs: list[ScalerRun] = []
    workdir = tmp_path / "workers"
    try:
        yield runs, workdir
    finally:
        for run in runs:
            run.stop(signal.SIGTERM)
        stop_workers(workdir)


def field(page: Any, service: str, name: str) -> str:
    return str(page.locator(f'[data-service="{service}"] [data-field="{name}"]').inner_text())


def replicas_on_page(page: Any, service: str) -> int:
    total = 0
    for name in ("serving", "starting"):
        text = field(page, service, name)
        total += int(text) if text.isdigit() else 0
    return total


def chart_max(page: Any, service: str, key: str) -> float:
    """The largest value of ``key`` in the points the page charts for ``service``."""
    value = page.evaluate(
        """([service, key]) => Math.max(0, ...window.dashboard.points
             .map((p) => (p.services[service] || {})[key]).filter((v) => v !== null))""",
        [service, key],
    )
    return float(value)


def test_the_dashboard_shows_a_burst_and_controls_need_the_token(
    scalers: tuple[list[ScalerRun], Path], tmp_path: Path, env: dict[str, str], page: Any
) -> None:
    runs, workdir = scalers
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    leader = start_scaler_run("dash", policy, workdir, tmp_path, env, "--concurrency", "2")
    runs.append(leader)
    poll_until(
        lambda: leader.service("io").get("current") == 1 and leader.get_json("/healthz")[0] == 200,
        "the scaler to start io's minimum and answer /healthz",
    )
    url = f"http://127.0.0.1:{leader.http_port}/"

    page.goto(url)
    page.wait_for_selector('#conn[data-state="live"]')
    page.wait_for_selector('[data-service="io"] .u-wrap')  # the charts are drawn
    assert page.locator("#role").inner_text() == "leader"
    assert page.locator("#standby").is_hidden()
    assert page.console_problems == [], page.console_problems
    page.select_option("#window", "60")

    app = service_app(env)
    try:
        for _ in range(BURST):
            app.send_task("tasks.io_intensive.wait", kwargs={"duration": 0.6})
    finally:
        app.close()
    # On the chart, and the replica count rises on the page, within a few seconds.
    poll_until(lambda: chart_max(page, "io", "waiting") > 0, "the burst on io's chart", 10)
    poll_until(lambda: replicas_on_page(page, "io") >= 2, "io's replicas to rise on the page", 15)
    page.wait_for_selector('#events li[data-kind="scale"][data-service="io"]')
    poll_until(lambda: chart_max(page, "io", "in_flight") > 0, "io's workers consuming", 15)
    shot = os.environ.get("DASHBOARD_SCREENSHOT")
    page.screenshot(path=shot or str(tmp_path / "dashboard.png"))
    assert replicas_on_page(page, "calm") == 1, "the quiet service did not move"

    # Without the token: refused, and nothing changes.
    card = page.locator('[data-service="io"]')
    page.fill("#token", "")
    card.locator(".pin-n").fill("1")
    card.locator('button[data-action="pin"]').click()
    page.wait_for_selector('#control-msg[data-ok="false"]')
    assert "missing 'Authorization: Bearer <token>'" in page.locator("#control-msg").inner_text()
    assert leader.get_json("/overrides")[1]["overrides"] == {}

    # With it: the pin holds io at 1; the page shows the drain and the new count.
    page.fill("#token", TOKEN)
    card.locator('button[data-action="pin"]').click()
    page.wait_for_selector('#control-msg[data-ok="true"]')
    overrides = leader.get_json("/overrides")[1]["overrides"]
    assert overrides["io"]["replicas"] == 1
    assert overrides["io"]["by"].endswith("via api@127.0.0.1") or overrides["io"]["by"] == (
        "api@127.0.0.1"
    )
    page.wait_for_selector('#events li[data-kind="override"][data-service="io"]')
    page.wait_for_selector('#events li[data-kind="drain"][data-service="io"]')
    poll_until(lambda: field(page, "io", "serving") == "1", "io pinned to 1 on the page", 20)
    assert "[pinned 1]" in card.locator(".override").inner_text()
    card.locator('button[data-action="unpin"]').click()
    # A function, not an expression string: Playwright would eval() a string in the page, and
    # the dashboard's Content-Security-Policy (no 'unsafe-eval') refuses that, as it should.
    page.wait_for_function(
        "() => document.querySelector('#control-msg').textContent.includes('unpin done')"
    )

    # A standby's dashboard is a live, read-only view that says so.
    standby = start_scaler_run("dash-standby", policy, workdir, tmp_path, env)
    runs.append(standby)
    poll_until(lambda: (standby.state() or {}).get("role") == "standby", "the standby")
    other = page.context.new_page()
    other.goto(f"http://127.0.0.1:{standby.http_port}/")
    other.wait_for_selector('#role[data-role="standby"]')
    assert "read-only" in other.locator("#standby").inner_text()
    assert other.locator('[data-service="io"] button[data-action="pin"]').is_disabled()
    other.close()
    # Chromium logs the refused request (401) itself; nothing else may appear.
    expected = "the server responded with a status of 401"
    assert [p for p in page.console_problems if expected not in p] == [], page.console_problems
