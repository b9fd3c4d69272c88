"""What runs cost: billed units from fal's answers, prices from the Platform API, the batch budget.

The emulator answers ``X-Fal-Billable-Units`` on successful results (one unit per image, else
one per request; none on a failure) and serves ``GET /v1/models/pricing`` on its own host
(connection extra ``api_url``). Real HTTP on 127.0.0.1 and real ``airflow dags test`` runs.
"""

from __future__ import annotations

import json

import pytest

from airflow_provider_fal.batch.budget import Budget, FalBudgetError, check_max_cost, expected_units
from airflow_provider_fal.core import billing
from airflow_provider_fal.core.billing import Pricing, billable_units, fetch_pricing, parse_pricing
from airflow_provider_fal.core.client import FalClient
from airflow_provider_fal.exceptions import FalConfigurationError, FalError
from tests.conftest import API_KEY


@pytest.fixture(autouse=True)
def fresh_price_cache():
    billing._cache.clear()
    yield
    billing._cache.clear()


@pytest.fixture
def client(emulator):
    fal = FalClient(API_KEY, run_url=emulator.url, queue_url=emulator.queue_url)
    yield fal
    fal.close()


def test_results_carry_the_billed_units_and_failures_bill_nothing(emulator, client):
    two = client.run("fal-ai/flux/dev", {"prompt": "x", "num_images": 2}).output
    assert len(two["images"]) == 2
    response = client.send(client_request(client, "fal-ai/flux/dev", {"prompt": "y", "num_images": 3}))
    assert response.billable_units == 3.0
    assert client.send(client_request(client, "emulator/echo", {"a": 1})).billable_units == 1.0
    handle = client.submit("fal-ai/flux/dev", {"prompt": "q"})
    assert client.wait(handle, timeout=30, poll_interval=0.05).billable_units == 1.0
    emulator.fail_queued(error="Runner ran out of memory", error_type="runner_server_error")
    failed = client.submit("fal-ai/flux/dev", {"prompt": "f"})
    with pytest.raises(FalError):
        client.wait(failed, timeout=30, poll_interval=0.05)
    result_answers = [r for r in emulator.requests if r.path.endswith(f"/requests/{failed.request_id}")]
    assert result_answers and all(r.status >= 500 for r in result_answers)


def client_request(client, model_id, arguments):
    from airflow_provider_fal.core.request import prepare_request

    return prepare_request(model_id, arguments)


def test_pricing_is_read_from_the_platform_api_and_cached(emulator, client):
    pricing = fetch_pricing(client, emulator.url, "fal-ai/flux/dev")
    assert pricing == Pricing("fal-ai/flux/dev", 0.025, "images", "USD")
    assert fetch_pricing(client, emulator.url, "fal-ai/flux/dev") == pricing
    assert emulator.count("GET", "/v1/models/pricing") == 1  # the second came from the cache
    assert fetch_pricing(client, emulator.url, "nobody/unknown-model") is None


def test_a_pricing_api_that_cannot_be_reached_is_asked_once_then_left_alone(client):
    with pytest.raises(FalError):
        fetch_pricing(client, "http://127.0.0.1:9", "fal-ai/flux/dev")  # nothing listens on port 9
    assert fetch_pricing(client, "http://127.0.0.1:9", "fal-ai/flux/dev") is None  # not asked again for 5 min


@pytest.mark.parametrize(
    ("headers", "units"),
    [
        ({"X-Fal-Billable-Units": "2"}, 2.0),
        ({"x-fal-billable-units": " 0.5 "}, 0.5),
        ({"X-Fal-Billable-Units": "-1"}, None),
        ({"X-Fal-Billable-Units": "nan"}, None),
        ({"X-Fal-Billable-Units": "lots"}, None),
        ({}, None),
    ],
)
def test_billable_units_header(headers, units):
    assert billable_units(headers) == units


def test_pricing_answers_that_make_no_sense_give_no_price():
    assert parse_pricing({"prices": [{"endpoint_id": "a/b", "unit_price": -1}]}, "a/b") is None
    assert parse_pricing({"prices": [{"endpoint_id": "a/b", "unit_price": True}]}, "a/b") is None
    assert parse_pricing({"prices": "none"}, "a/b") is None
    assert parse_pricing({"prices": [{"endpoint_id": "a/b", "unit_price": 0.5}]}, "a/b").unit_price == 0.5


def test_the_budget_estimates_refuses_and_stops():
    budget = Budget(Pricing("m/x", 0.5, "images", "USD"), max_cost=10)
    inputs = [{"prompt": "a", "num_images": 4}, {"prompt": "b"}, {"prompt": "c", "num_images": 1}]
    assert [expected_units(item) for item in inputs] == [4.0, 1.0, 1.0]
    assert budget.estimate(inputs) == 3.0
    budget.check_start("m/x", inputs, billed_units=0, log=_Quiet())  # 3 USD of 10: fine
    with pytest.raises(FalBudgetError, match="exceeds max_cost=10; nothing was sent"):
        budget.check_start("m/x", inputs, billed_units=15, log=_Quiet())  # 7.5 billed before + 3
    assert not budget.spent(19) and budget.spent(20)
    with pytest.raises(FalBudgetError, match="needs fal's price"):
        Budget(None, max_cost=1).check_start("m/x", inputs, 0, _Quiet())
    Budget(None).check_start("m/x", inputs, 0, _Quiet())  # no price, no limit: only nothing to log
    for bad in (-1, "many", float("nan"), True):
        with pytest.raises(FalConfigurationError, match="max_cost must be a number"):
            check_max_cost(bad)
    assert check_max_cost("2.5") == 2.5


class _Quiet:
    def info(self, *args):
        pass


BILLING_DAG = """
import json, os
import pendulum
from airflow.sdk import DAG, XComArg, task
from airflow_provider_fal.operators.batch import FalBatchRunOperator, SUMMARY_XCOM_KEY
from airflow_provider_fal.operators.fal import FalRunOperator

with DAG("fal_billing", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")) as dag:
    sync = FalRunOperator(task_id="sync", model_id="fal-ai/flux/dev", arguments={"prompt": "a", "num_images": 2})
    deferred = FalRunOperator(task_id="deferred", model_id="fal-ai/flux/dev", arguments={"prompt": "b"},
                              deferrable=True, poll_interval=0.1)
    batch = FalBatchRunOperator(task_id="batch", model_id="fal-ai/flux/schnell",
                                inputs=[{"prompt": f"p{n}"} for n in range(6)], max_cost=1)
    over_budget = FalBatchRunOperator(task_id="over_budget", model_id="fal-ai/flux/dev",
                                      inputs=[{"prompt": f"p{n}", "num_images": 4} for n in range(20)], max_cost=1)

    @task(trigger_rule="all_done")
    def receive(sync_billing, deferred_billing, batch_summary, batch_results):
        with open(os.environ["OUT"], "w") as handle:
            json.dump({"sync": sync_billing, "deferred": deferred_billing, "batch": batch_summary,
                       "entries": batch_results}, handle)

    receive(XComArg(sync, key="fal_billing"), XComArg(deferred, key="fal_billing"),
            XComArg(batch, key=SUMMARY_XCOM_KEY), batch.output)
"""


@pytest.mark.e2e
def test_billing_reaches_xcom_and_the_budget_guards_the_batch(emulator, fal_connection, run_dag, out_file):
    emulator.set_queue_timing(queue_wait=0, run_time=0.1)
    result = run_dag("fal_billing", BILLING_DAG, env={"OUT": str(out_file)})
    got = json.loads(out_file.read_text())

    assert got["sync"]["units"] == 2.0 and got["sync"]["unit_price"] == 0.025 and got["sync"]["cost"] == 0.05
    assert got["sync"]["currency"] == "USD" and got["sync"]["request_id"]
    assert got["deferred"]["units"] == 1.0 and got["deferred"]["cost"] == 0.025

    summary = got["batch"]
    assert summary["billed_units"] == 6.0 and summary["cost"] == pytest.approx(0.018)
    assert all(entry["billed_units"] == 1.0 for entry in got["entries"])
    assert "estimated cost of the 6 inputs to send: 0.0180 USD" in result.output

    # 20 inputs x 4 images x 0.025 = 2 USD > max_cost=1: refused before anything was sent
    assert "exceeds max_cost=1; nothing was sent" in result.output
    assert not [
        r
        for r in emulator.requests
        if r.method == "POST" and "fal-ai/flux/dev" in r.path and (r.json or {}).get("num_images") == 4
    ]
    assert API_KEY not in result.output


def test_a_batch_stops_sending_once_the_billed_units_reach_max_cost(emulator, client):
    """The estimate can be low (a model billing more units than expected): the billed units fal
    reports then stop the batch. In flight requests finish; the rest are reported as not sent."""
    from airflow_provider_fal.batch.inputs import prepare_inputs
    from airflow_provider_fal.batch.runner import FalBatchRunner
    from airflow_provider_fal.core.request import prepare_request

    class Underestimated(Budget):
        def estimate(self, arguments):
            return 0.0

    emulator.set_latency(0.02)
    runner = FalBatchRunner(client, max_concurrency=1, progress_interval=3600)
    items = prepare_inputs(prepare_request("emulator/echo"), [{"n": n} for n in range(40)])
    budget = Underestimated(Pricing("emulator/echo", 0.02, "requests", "USD"), max_cost=0.1)
    result = runner.run(items, budget=budget)
    summary = result.summary()
    print(summary)
    assert summary["succeeded"] == 5 and summary["not_run"] == 35  # 5 x 0.02 = 0.1 reached
    assert summary["billed_units"] == 5.0 and summary["cost"] == pytest.approx(0.1)
    assert "max_cost=0.1 reached" in summary["stopped"]
    assert emulator.count("POST", "/emulator/echo") == 5
