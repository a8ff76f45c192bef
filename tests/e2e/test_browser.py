"""A real browser (Debian's chromium, headless, driven by Playwright) through the real UI."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tenants.models import AuditEntry
from tests.conftest import PASSWORD, World

OUTPUT = Path(__file__).resolve().parents[2] / "test-output"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def sign_in(page: Any, live_server: Any, username: str) -> None:
    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{live_server.url}/")


@pytest.fixture
def browser_page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the live server's DB work is elsewhere.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        try:
            yield page
        finally:
            browser.close()
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


@pytest.mark.django_db(transaction=True)
def test_it_signs_in_creates_a_token_and_sees_it_in_the_audit_log(
    world: World, live_server: Any, browser_page: Any
) -> None:
    page = browser_page
    outside_requests: list[str] = []
    local = (live_server.url, "data:")
    page.on("request", lambda r: None if r.url.startswith(local) else outside_requests.append(r.url))
    sign_in(page, live_server, "alice")

    page.goto(f"{live_server.url}/tokens/")
    page.get_by_label("Name").fill("laptop")
    page.get_by_role("button", name="Create token").click()
    secret = page.locator("code", has_text="bh_").first
    secret.wait_for(timeout=10_000)
    assert secret.inner_text().startswith("bh_")

    page.goto(f"{live_server.url}/audit/?action=token.create")
    page.get_by_text("name=laptop").first.wait_for(timeout=10_000)
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "audit-after-token.png"), full_page=True)

    entry = AuditEntry.objects.get(action="token.create", details__name="laptop")
    assert entry.actor == world.user("alice") and entry.outcome == "ok"
    assert entry.source_address == "127.0.0.1"
    assert outside_requests == []


@pytest.mark.django_db(transaction=True)
def test_it_compares_a_revision_with_a_picked_one_in_place(
    world: World, live_server: Any, browser_page: Any
) -> None:
    from compute.desired.models import DesiredRevision

    text = "apiVersion: bulkhead/v1\nkind: TenantConfig\nspec:\n  networks:\n    - name: {}\n"
    revisions = [
        DesiredRevision.objects.create(
            tenant=world.acme, number=n, text=text.format(name), sha256=f"{n:064d}"
        )
        for n, name in ((1, "alpha"), (2, "beta"), (3, "gamma"))
    ]
    page = browser_page
    sign_in(page, live_server, "vic")

    page.goto(f"{live_server.url}/desired/revisions/{revisions[2].pk}/")
    heading = page.locator("#diff-heading")
    assert heading.inner_text() == "Changes since revision 2"
    page.evaluate("window.__same_page = true")  # gone if the browser loaded a new page
    page.get_by_label("Compare with revision").select_option("1")
    page.locator('#desired-diff[data-base="1"]').wait_for(timeout=10_000)
    assert heading.inner_text() == "Changes since revision 1"
    assert "- name: alpha" in page.locator("#desired-diff pre.diff").inner_text()
    assert page.evaluate("window.__same_page === true")  # swapped by htmx, not reloaded
    assert page.url.endswith(f"/desired/revisions/{revisions[2].pk}/?against=1")


@pytest.mark.django_db(transaction=True)
def test_it_plots_a_workloads_sampled_history(world: World, live_server: Any, browser_page: Any) -> None:
    import time
    import uuid

    from compute import sampling
    from compute.models import Host, Workload
    from tests.imaging.images import db_image

    host = Host.objects.create(name="plot-host", cpus=2, memory_mib=4096)
    image = db_image(world.acme, f"plot-{uuid.uuid4().hex[:6]}")
    workload = Workload.objects.create(
        tenant=world.acme, name="plotted", image=image, host=host, state="running"
    )
    now = time.time()
    for i in range(12):
        raw = {"cpu_seconds": 0.5 * 10 * i, "memory_bytes": (20 + i) * 1024 * 1024, "net_rx_bytes": 4096 * i}
        sampling.record("workload", workload.pk, world.acme.pk, raw, now - 110 + 10 * i)

    page = browser_page
    sign_in(page, live_server, "vic")
    page.goto(f"{live_server.url}/workloads/{workload.pk}/")
    page.wait_for_function(
        "document.querySelector('[data-plot=cpu]') && document.querySelector('[data-plot=cpu]')._uplot"
    )
    points = page.evaluate(
        "() => { const u = document.querySelector('[data-plot=cpu]')._uplot;"
        " return u.data[1].filter(v => v !== null).length; }"
    )
    assert points >= 10
    memory = page.evaluate(
        "() => Math.max(...document.querySelector('[data-plot=memory]')._uplot.data[1]"
        ".filter(v => v !== null))"
    )
    assert memory == 31 * 1024 * 1024
    assert page.locator("[data-plot=cpu] canvas").count() == 1
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "workload-plots.png"), full_page=True)


@pytest.mark.django_db(transaction=True)
def test_it_folds_the_menu_and_scrolls_tables_inside_cards_at_phone_width(
    world: World, live_server: Any, browser_page: Any
) -> None:
    page = browser_page
    page.set_viewport_size({"width": 390, "height": 844})
    sign_in(page, live_server, "oscar")
    page.goto(f"{live_server.url}/audit/")
    header = page.locator("header.topbar").bounding_box()
    assert header is not None and header["height"] < 80  # one row: the menu is folded
    assert not page.locator("#mainnav").is_visible()
    toggle = page.get_by_role("button", name="Menu")
    toggle.click()
    assert page.locator("#mainnav").is_visible()
    assert toggle.get_attribute("aria-expanded") == "true"
    page.get_by_role("link", name="Hosts").wait_for()
    toggle.click()
    assert not page.locator("#mainnav").is_visible()
    # Nothing makes the page itself wider than the phone; a wide table scrolls inside its card.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    widest = page.evaluate(
        "() => Math.max(...[...document.querySelectorAll('.card table')]"
        ".map(t => t.scrollWidth - t.clientWidth))"
    )
    assert widest > 0
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "phone-audit.png"), full_page=False)


@pytest.mark.django_db(transaction=True)
def test_it_shows_bytes_sent_while_an_image_archive_uploads(
    world: World, live_server: Any, browser_page: Any, tmp_path: Path, settings: Any
) -> None:
    from tests.imaging.images import build_image, busybox_layers, write_oci_archive

    settings.BULKHEAD_STORE_DIR = tmp_path / "store"
    archive = write_oci_archive(build_image(busybox_layers()), tmp_path / "busybox.tar")
    page = browser_page
    sign_in(page, live_server, "alice")
    page.goto(f"{live_server.url}/images/")
    page.evaluate(
        "() => { window.__uploadTexts = []; document.addEventListener('htmx:xhr:progress', () => {"
        " const t = document.querySelector('[data-upload-text]');"
        " if (t) window.__uploadTexts.push(t.textContent); }); }"
    )
    page.set_input_files("input[type=file]", str(archive))
    page.get_by_label("Name").first.fill("uploaded")
    page.get_by_role("button", name="Upload and import").click()
    page.wait_for_function("window.__uploadTexts.some(t => t.includes('sent'))")
    texts = page.evaluate("window.__uploadTexts")
    assert any(text.endswith("sent; importing…") for text in texts), texts
    assert all(" of " in text for text in texts)
