"""A real Airflow 3 deployment for the system tests: one process per component, Celery on Redis,
PostgreSQL as the metadata DB, S3 on moto, the fal emulator in its own process.

Every component shares one environment (``AIRFLOW_HOME``, the DB, the broker, the JWT secret,
``AIRFLOW_CONN_FAL_DEFAULT`` and ``AIRFLOW_CONN_AWS_DEFAULT``) and writes its own log file in
``workdir``. ``components`` holds them by name; each can be stopped, killed (SIGKILL to its
process group) and started again while the others run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from tests.system.services import Emulator, Moto, Postgres, Redis, Service, free_port, wait_for_port

WORKERS = ("worker1", "worker2")
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer", *WORKERS)
BUCKET = "fal-system"


class Component(Service):
    def __init__(self, name: str, workdir: Path, command: list[str], env: dict[str, str]) -> None:
        super().__init__(name, workdir)
        self.command = command
        self.env = env

    def start(self) -> None:
        self.spawn([sys.executable, "-m", "airflow", *self.command], env=self.env)


class Deployment:
    def __init__(self, api_key: str) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="fal-system-"))
        self.workdir.chmod(0o755)  # Postgres runs as nobody under it
        self.home = self.workdir / "airflow"
        self.dags = self.home / "dags"
        self.dags.mkdir(parents=True)
        self.api_key = api_key
        self.postgres = Postgres(self.workdir)
        self.redis = Redis(self.workdir)
        self.moto = Moto(self.workdir)
        self.emulator = Emulator(self.workdir, api_key)
        self.api_port = free_port()
        self.env = self._environment()
        self.components: dict[str, Component] = {}
        for name in COMPONENTS:
            if name in WORKERS:
                command = ["celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency", "8"]
                command += ["--skip-serve-logs", "--without-mingle", "--without-gossip"]
            elif name == "triggerer":
                command = ["triggerer", "--skip-serve-logs"]
            else:
                command = [name]
            self.components[name] = Component(name, self.workdir, command, self.env)

    def _environment(self) -> dict[str, str]:
        db = self.postgres.dsn
        api = f"http://127.0.0.1:{self.api_port}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
        env.pop("FAL_KEY", None)
        return {
            **env,
            "PYTHONUNBUFFERED": "1",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__PARALLELISM": "32",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{db}",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis.port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{db}",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": api,
            "AIRFLOW__API_AUTH__JWT_SECRET": "system-test-jwt-secret-not-for-production",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "2",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            # a killed worker's task is noticed after this many seconds without a heartbeat
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
            # a killed triggerer's triggers go to another triggerer after this many seconds
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW__OPENLINEAGE__DISABLED": "True",
            "AIRFLOW_CONN_FAL_DEFAULT": json.dumps(
                {
                    "conn_type": "fal",
                    "host": self.emulator.url,
                    "password": self.api_key,
                    "extra": {
                        "queue_url": self.emulator.queue_url,
                        # fal's Platform API (prices) and CDN hosts: the emulator serves them too
                        "api_url": self.emulator.url,
                        "rest_url": self.emulator.url,
                        "cdn_url": self.emulator.url,
                    },
                }
            ),
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
                {
                    "conn_type": "aws",
                    "login": "testing",
                    "password": "testing",
                    "extra": {"endpoint_url": self.moto.url, "region_name": "us-east-1"},
                }
            ),
        }

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for service in (self.postgres, self.redis, self.moto, self.emulator):
            service.start()
        self.moto.client().create_bucket(Bucket=BUCKET)
        migrated = self.cli("db", "migrate")
        if migrated.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed: {migrated.stdout[-3000:]}")
        for component in self.components.values():
            component.start()
        wait_for_port(self.api_port, self.components["api-server"].process, "airflow api-server", timeout=120)
        self.wait_workers_ready(WORKERS)

    def wait_workers_ready(self, names: Iterable[str]) -> None:
        """Wait until each Celery worker named has logged "<name>@<host> ready." (fails with its log if it died)."""
        for name in names:
            self.components[name].wait_logged(" ready.", timeout=120)

    def ensure_running(self) -> None:
        """Start every component a test stopped or killed."""
        restarted = [name for name, component in self.components.items() if not component.running]
        for name in restarted:
            self.components[name].start()
        self.wait_workers_ready([name for name in restarted if name in WORKERS])

    def stop(self) -> None:
        """SIGKILL the Airflow components (a graceful shutdown takes 30 s and more each), then the services."""
        for component in self.components.values():
            component.kill()
        for service in (self.emulator, self.moto, self.redis, self.postgres):
            service.stop()

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.home,
            timeout=timeout,
        )

    # ------------------------------------------------------------------ DAGs and runs

    def add_dag(self, dag_id: str, source: str, timeout: float = 120) -> None:
        (self.dags / f"{dag_id}.py").write_text(textwrap.dedent(source))
        deadline = time.monotonic() + timeout
        while not self.postgres.query("select 1 from dag where dag_id = %s and not is_paused", dag_id):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{dag_id} was not parsed within {timeout} s; see {self.workdir}/dag-processor.log")
            time.sleep(1)

    def trigger(self, dag_id: str, run_id: str, conf: dict | None = None) -> None:
        body = json.dumps({"dag_run_id": run_id, "logical_date": None, "conf": conf or {}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}/api/v2/dags/{dag_id}/dagRuns",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            assert answer.status == 200, answer.read()

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        rows = self.postgres.query("select state from dag_run where dag_id = %s and run_id = %s", dag_id, run_id)
        return rows[0][0] if rows else None

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.run_state(dag_id, run_id)) not in ("success", "failed"):
            if time.monotonic() > deadline:
                raise AssertionError(f"{dag_id}/{run_id} is {state} after {timeout} s; logs in {self.workdir}")
            time.sleep(1)
        return state

    def task_states(self, dag_id: str, run_id: str) -> dict[str, int]:
        rows = self.postgres.query(
            "select coalesce(state, 'none'), count(*) from task_instance where dag_id = %s and run_id = %s "
            "group by state",
            dag_id,
            run_id,
        )
        return dict(rows)

    def wait_states(self, dag_id: str, run_id: str, state: str, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.task_states(dag_id, run_id).get(state, 0) < count:
            if time.monotonic() > deadline:
                states = self.task_states(dag_id, run_id)
                raise AssertionError(f"wanted {count} {state} task instances, have {states}; logs in {self.workdir}")
            time.sleep(0.5)

    def tries(self, dag_id: str, run_id: str) -> list[tuple]:
        """(task_id, map_index, try_number, state, hostname, pid) of every try, the current ones included."""
        select = "select task_id, map_index, try_number, state, hostname, pid from {} where dag_id = %s and run_id = %s"
        rows = self.postgres.query(select.format("task_instance"), dag_id, run_id)
        rows += self.postgres.query(select.format("task_instance_history"), dag_id, run_id)
        return sorted(set(rows), key=lambda row: (row[0], row[1], row[2]))

    def all_logs(self) -> str:
        """Every log the deployment wrote: the components', the services' and the task logs."""
        paths = list(self.workdir.glob("*.log")) + list((self.home / "logs").rglob("*"))
        return "\n".join(path.read_text(errors="replace") for path in paths if path.is_file())

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> dict[int, object]:
        """map index -> the XCom value."""
        rows = self.postgres.query(
            "select map_index, value from xcom where dag_id = %s and run_id = %s and task_id = %s and key = %s",
            dag_id,
            run_id,
            task_id,
            key,
        )
        return dict(rows)  # psycopg2 decodes the JSONB column

    def executions(self, dag_id: str, run_id: str) -> dict[str, list[str]]:
        """Task log path (task, map index, try) -> the Celery workers that executed it, in order.

        A deferred task is executed twice in one try: the submit, and the resume after the trigger.
        """
        found: dict[str, list[tuple[str, str]]] = {}
        marker = f"log_path='dag_id={dag_id}/run_id={run_id}/"
        for worker in WORKERS:
            for line in (self.workdir / f"{worker}.log").read_text(errors="replace").splitlines():
                if "Executing workload in Celery" in line and marker in line:
                    path = line.split(marker, 1)[1].split("'", 1)[0]
                    found.setdefault(path, []).append((line[:32], worker))  # ISO timestamp first
        return {path: [worker for _, worker in sorted(runs)] for path, runs in found.items()}
