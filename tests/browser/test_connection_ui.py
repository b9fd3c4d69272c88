"""The ``fal`` connection in the real Airflow UI, driven in a real (headless) Chromium.

One end-to-end story, as a user lives it: start ``airflow api-server`` (SQLite, 127.0.0.1,
``[core] test_connection = Enabled``, the simple auth manager with a known password) next
to the fal emulator; sign in; Admin -> Connections -> Add; pick ``fal.ai``; check what the
form shows (labels, placeholders, hidden fields, extras); fill and save it; check the key is
masked on the list and the edit page; press Test with a good and a bad key; then run a DAG
whose FalRunOperator uses the connection the UI stored.

Screenshots go to a temporary folder, or to ``docs/`` with ``FAL_DOCS_SCREENSHOTS=1``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from tests.browser.support import (
    UI_TIMEOUT,
    ApiServer,
    Traffic,
    chromium_page,
    connection_row,
    ensure_browser,
    field_labels,
    helper_texts,
    open_connections,
    reload_connections,
    sign_in,
    toast_mark,
    toasts_shown,
    wait_no_toasts,
    wait_toast,
)
from tests.conftest import AIRFLOW_ENV, API_KEY, REPO, airflow_cli

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

BAD_KEY = "not-the-key-0b1d"
UI_CONN = "fal_ui"
CLI_CONN = "fal_cli"
#: Airflow 3.3.2's Test button posts ``port: 0`` for a connection without a port, and its API
#: refuses that as "a different endpoint" (fixed upstream in apache/airflow#73298).
PORT_BUG_DETAIL = "The host or port to test differs from the stored connection"

DAG_SOURCE = """
import json, os
import pendulum
from airflow.sdk import DAG, task
from airflow_provider_fal.operators.fal import FalRunOperator

with DAG("fal_ui_connection", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")) as dag:
    generate = FalRunOperator(
        task_id="generate",
        fal_conn_id="fal_ui",
        model_id="fal-ai/fast-sdxl",
        arguments={"prompt": "a lighthouse at dusk", "image_size": "square", "seed": 3},
    )

    @task
    def receive(result):
        with open(os.environ["OUT"], "w") as handle:
            json.dump(result, handle)

    receive(generate.output)
"""


def airflow_version() -> tuple[int, int]:
    from airflow import __version__

    major, minor = __version__.split(".")[:2]
    return int(major), int(minor)


@pytest.fixture(scope="module")
def browser_available() -> None:
    if airflow_version() < (3, 2):
        pytest.skip(
            "Airflow < 3.2 builds the connection form from hook methods and only with WTForms installed; "
            "this browser test covers the provider-info form of Airflow 3.2+ (the form metadata test "
            "covers the older path)."
        )
    reason = ensure_browser()
    if reason:
        pytest.skip(f"no browser can be installed here: {reason}")


@pytest.fixture
def screenshots(tmp_path) -> Path:
    if os.environ.get("FAL_DOCS_SCREENSHOTS") == "1":
        return REPO / "docs"
    return tmp_path


@pytest.fixture
def api_server(airflow_db, tmp_path):
    """A real Airflow API server on the test session's Airflow home (same metadata DB)."""
    password = secrets.token_urlsafe(12)
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"admin": password}))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")},
        **AIRFLOW_ENV,
        "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
    }
    server = ApiServer(env=env, cwd=tmp_path, log_path=tmp_path / "api-server.log", admin_password=password)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for conn_id in (UI_CONN, CLI_CONN):
            airflow_cli("connections", "delete", conn_id)


def provider_form() -> dict:
    from airflow_provider_fal.get_provider_info import fal_connection_form

    return fal_connection_form()


def test_fal_connection_through_the_ui(
    browser_available, api_server, emulator, run_dag, out_file, screenshots, monkeypatch
):
    from playwright.sync_api import expect  # installed by the browser_available fixture

    monkeypatch.delenv("AIRFLOW_CONN_FAL_DEFAULT", raising=False)
    form = provider_form()
    behaviour = form["ui-field-behaviour"]
    traffic = Traffic()
    with chromium_page(traffic) as page:
        sign_in(page, api_server.url, "admin", api_server.admin_password)
        open_connections(page, traffic)

        # -- the add form: the fal type, its labels, placeholders, hidden fields and extras
        page.get_by_role("button", name="Add Connection").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_label("Connection ID").fill(UI_CONN)
        conn_type = dialog.get_by_role("combobox")
        conn_type.click()
        page.get_by_role("option").first.wait_for()
        assert "fal.ai" in page.get_by_role("option").all_inner_texts()
        conn_type.fill("fal")
        page.get_by_role("option", name="fal.ai", exact=True).click()

        host = dialog.locator('input[name="host"]')
        key = dialog.locator('input[name="password"]')
        assert dialog.get_by_label("Base URL").get_attribute("name") == "host"
        assert dialog.get_by_label("API Key").get_attribute("name") == "password"
        assert host.get_attribute("placeholder") == "https://fal.run" == behaviour["placeholders"]["host"]
        assert key.get_attribute("placeholder") == behaviour["placeholders"]["password"]
        assert key.get_attribute("type") == "password"
        for hidden in behaviour["hidden-fields"]:
            assert dialog.locator(f'[name="{hidden}"]').count() == 0, f"{hidden} should be hidden"
        assert not {"Host", "Login", "Password", "Port", "Schema"} & set(field_labels(dialog))
        dialog.screenshot(path=str(screenshots / "connection-form-empty.png"))

        # -- the extras, in their own section of the form (one section is open at a time)
        dialog.get_by_role("button", name="Extra Fields", exact=True).click()
        dialog.locator('input[name="element_queue_url"]').wait_for()
        labels, helps = field_labels(dialog), helper_texts(dialog)
        for name, spec in form["conn-fields"].items():
            assert spec["label"] in labels, (name, labels)
            assert spec["description"] in helps, (name, helps)
            assert dialog.locator(f'[id="element_{name}"], [id="number-input:element_{name}"]').count() == 1
        dialog.locator('input[name="element_queue_url"]').fill(emulator.queue_url)
        dialog.locator('[id="number-input:element_timeout"] input').fill("60")
        dialog.screenshot(path=str(screenshots / "connection-form-extras.png"))

        # -- fill in the standard fields and save
        dialog.get_by_role("button", name="Standard Fields").click()
        host.fill(emulator.url)
        key.fill(API_KEY)
        dialog.screenshot(path=str(screenshots / "connection-form-filled.png"))
        assert API_KEY not in dialog.inner_text()
        with page.expect_response(
            lambda r: r.url.endswith("/api/v2/connections") and r.request.method == "POST"
        ) as saved:
            dialog.get_by_role("button", name="Save").click()
        assert saved.value.status == 201, saved.value.text()
        row = connection_row(page, UI_CONN)
        row.wait_for()
        assert emulator.url in row.inner_text()

        # -- the key is masked on the list page and on the edit page
        expect(page.get_by_role("dialog")).to_have_count(0, timeout=UI_TIMEOUT)
        assert API_KEY not in page.content()
        row.get_by_role("button", name="Edit Connection").click()
        dialog = page.get_by_role("dialog")
        edit_key = dialog.locator('input[name="password"]')
        edit_key.wait_for()
        expect(edit_key).not_to_have_value("")  # the form fills in after it opens
        assert edit_key.get_attribute("type") == "password"
        assert edit_key.input_value() not in ("", API_KEY)
        assert API_KEY not in dialog.inner_html()
        # Saving an edit of another field keeps the stored key (the DAG run below needs it).
        dialog.locator('textarea[name="description"]').fill("fal.ai, created in the UI")
        with page.expect_response(lambda r: f"/api/v2/connections/{UI_CONN}" in r.url) as patched:
            dialog.get_by_role("button", name="Save").click()
        assert patched.value.status == 200, patched.value.text()
        expect(connection_row(page, UI_CONN)).to_contain_text("created in the UI", timeout=UI_TIMEOUT)

        # -- Test on the UI-made connection (no port)
        shown = toast_mark(page)
        ui_test = press_test(page, UI_CONN)
        if ui_test.status == 400 and PORT_BUG_DETAIL in ui_test.text():
            # Airflow 3.3.2's own bug; the fal hook is never reached. The CLI-made connection
            # below (which has a port) gets through and shows what the Test button says.
            wait_toast(page, "Test Connection Failed", "Bad Request", since=shown)
            ui_port_bug = True
        else:
            assert ui_test.status == 200, ui_test.text()
            assert ui_test.json()["status"] is True, ui_test.text()
            wait_toast(page, "Test Connection Successful", "fal accepted the API key", since=shown)
            ui_port_bug = False
        toasts = toasts_shown(page)

        # -- a connection made with the README's CLI command, tested with a good key ...
        added = airflow_cli(
            "connections", "add", CLI_CONN, "--conn-type", "fal", "--conn-password", API_KEY,
            "--conn-host", emulator.url, "--conn-port", str(emulator.port),
            "--conn-extra", json.dumps({"queue_url": emulator.queue_url}),
        )  # fmt: skip
        assert added.returncode == 0, added.stdout + added.stderr
        reload_connections(page, traffic)
        probes_before = probe_statuses(emulator)
        wait_no_toasts(page)
        shown = toast_mark(page)
        good = press_test(page, CLI_CONN)
        assert good.status == 200 and good.json()["status"] is True, good.text()
        toast = wait_toast(page, "Test Connection Successful", "fal accepted the API key", since=shown)
        page.screenshot(path=str(screenshots / "connection-test-success.png"), animations="disabled")
        assert probe_statuses(emulator)[len(probes_before) :] == [404]

        # ... then with a wrong key typed into the edit form
        connection_row(page, CLI_CONN).get_by_role("button", name="Edit Connection").click()
        dialog = page.get_by_role("dialog")
        dialog.locator('input[name="password"]').fill(BAD_KEY)
        shown = toast_mark(page)
        with page.expect_response(lambda r: f"/api/v2/connections/{CLI_CONN}" in r.url) as patched:
            dialog.get_by_role("button", name="Save").click()
        assert patched.value.status == 200, patched.value.text()
        wait_toast(page, "Update Connection", "successfully updated", since=shown)
        wait_no_toasts(page)
        shown = toast_mark(page)
        bad = press_test(page, CLI_CONN)
        assert bad.status == 200 and bad.json()["status"] is False, bad.text()
        failure = wait_toast(page, "Test Connection Failed", "rejected the API key", since=shown)
        page.screenshot(path=str(screenshots / "connection-test-failure.png"), animations="disabled")
        assert probe_statuses(emulator)[-1] == 401
        toasts += toasts_shown(page)
        for text in (toast, failure, *toasts):  # every toast shown, also those that closed
            assert API_KEY not in text and BAD_KEY not in text

    api_server.stop()
    assert not traffic.blocked, f"the UI tried to leave this machine: {traffic.blocked}"
    assert traffic.containing(API_KEY) == [], "the API key came back from the API server"
    assert traffic.containing(BAD_KEY) == [], "the wrong key came back from the API server"
    server_log = api_server.log()
    assert API_KEY not in server_log and BAD_KEY not in server_log

    # -- a DAG run whose operator uses the connection the UI stored in the metadata DB
    result = run_dag("fal_ui_connection", DAG_SOURCE, env={"OUT": str(out_file)})
    assert result.succeeded, result.output[-4000:]
    images = json.loads(out_file.read_text())["images"]
    assert len(images) == 1 and images[0]["width"] == 512
    runs = [r for r in emulator.requests if r.method == "POST" and r.path == "/fal-ai/fast-sdxl"]
    assert [r.status for r in runs] == [200]
    if ui_port_bug:  # shown with -s or -rP; Airflow routes warnings.warn into its logs
        print(
            f"note: this Airflow's Test button refuses connections without a port ({PORT_BUG_DETAIL!r}; "
            "apache/airflow#73298); docs/connection-ui.md has the workarounds"
        )


def press_test(page, conn_id: str):
    """Press the row's Test button; returns the API server's answer to the test request."""
    with page.expect_response(lambda r: r.url.endswith("/api/v2/connections/test")) as answer:
        connection_row(page, conn_id).get_by_role("button", name="Test Connection").click()
    return answer.value


def probe_statuses(emulator) -> list[int | None]:
    """Statuses of the credential probes (queue status of a request that cannot exist) so far."""
    return [r.status for r in emulator.requests if r.method == "GET" and "/requests/" in r.path]
