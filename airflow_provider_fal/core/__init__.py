"""fal's API contract, without Airflow: validation, requests, answers, retries, the queue, HTTP clients.

Nothing under this package imports ``airflow`` (tests/test_layout.py checks it), so it can be
used and tested on its own; the hook, operators and trigger sit on top of it.
"""
