"""compose.yaml, tested without a Docker engine: its commands run here, for real.

The file is parsed (with PyYAML when it is installed, else with the small reader below,
which is checked against PyYAML whenever some Python on the machine has it). Then each
variant's worker and Flower commands run as real subprocesses, with their environment
pointed at the local Redis (databases 8 and 9) or RabbitMQ instead of the compose
hostnames, and each service's health check runs against them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from celery_warmpool.ops.processes import ManagedProcess

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
#: Compose URLs and the local services that stand in for them.
LOCAL_URLS = {
    "redis://redis:6379/0": "redis://127.0.0.1:6379/8",
    "redis://redis:6379/1": "redis://127.0.0.1:6379/9",
    "amqp://guest:guest@rabbitmq:5672//": "amqp://guest:guest@127.0.0.1:5672//",
}
VARIANTS = {
    "redis": ("worker", "flower", "FLOWER_PORT"),
    "rabbitmq": ("worker-rabbitmq", "flower-rabbitmq", "FLOWER_RABBITMQ_PORT"),
}
POOLS = {"fetcher": 4, "digits": 2, "visits": 1}


# -- reading compose.yaml ----------------------------------------------------------------


def read_compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)")


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose's variable substitution: ``${VAR}``, ``${VAR:-default}``, ``$$``."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(found: re.Match[str]) -> str:
        if found.group(0) == "$$":
            return "$"
        name = found.group("name") or found.group("bare")
        given = variables.get(name)
        operator, argument = found.group("op"), found.group("arg") or ""
        if operator in (":-", "-") and (given is None or (operator == ":-" and not given)):
            return argument
        if operator in (":?", "?") and (given is None or (operator == ":?" and not given)):
            raise KeyError(f"compose.yaml needs {name}: {argument}")
        return given or ""

    return _VARIABLE.sub(substitute, value)


def seconds(duration: str | int) -> float:
    """A compose duration (``30s``, ``1m30s``) in seconds."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, duration
    return sum(float(amount) * units[unit] for amount, unit in parts)


# -- running services here ---------------------------------------------------------------


def local_environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment with compose hostnames replaced by the local services."""
    environment = {key: str(value) for key, value in service.get("environment", {}).items()}
    for key, value in environment.items():
        if "redis:6379" in value or "rabbitmq:5672" in value:
            assert value in LOCAL_URLS, f"{key}={value} has no local stand-in"
            environment[key] = LOCAL_URLS[value]
    return environment


def process_environment(extra: dict[str, str]) -> dict[str, str]:
    # What the image gives a container: the project's Python first on PATH, the project
    # on PYTHONPATH, HOSTNAME set to the host name (Celery's %h).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT),
            "HOSTNAME": socket.gethostname(), **extra}


def health_check_command(test: Any) -> list[str]:
    if isinstance(test, str):
        return ["sh", "-c", test]
    kind, *rest = test
    if kind == "CMD":
        return list(rest)
    assert kind == "CMD-SHELL", test
    return ["sh", "-c", rest[0]]


def run_health_check(service: dict[str, Any], env: dict[str, str]) -> str:
    check = service["healthcheck"]
    finished = subprocess.run(health_check_command(check["test"]), env=env, cwd=ROOT,
                              capture_output=True, text=True,
                              timeout=seconds(check["timeout"]))
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, f"health check {check['test']} failed:\n{output}"
    return output


def start(service: dict[str, Any], env: dict[str, str], log: Path) -> ManagedProcess:
    """Run a service's command as ``docker compose up`` would (without the container)."""
    return ManagedProcess(shlex.split(service["command"]), env=env, cwd=ROOT,
                          log_path=log).launch()


def wait_for(condition: Any, timeout: float, what: str, running: ManagedProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if running.exited():
            break
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout}s; log:\n{running.log()}")


def http_get(url: str, auth: str | None = None, *, bearer: str | None = None,
             body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """GET ``url`` (or POST ``body`` as JSON) with basic or bearer authorization."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={
        "Content-Type": "application/json"} if data else {})
    if auth:
        request.add_header("Authorization",
                           "Basic " + base64.b64encode(auth.encode()).decode())
    if bearer:
        request.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# A client of the running worker, in its own process so that it reads the same
# environment the services do: a call on two pools and this node's pool status.
CLIENT = """
import json, sys
from celery_warmpool import Signal
from examples.ml_inference import digits_split, predict
from examples.service import app, warm

node = sys.argv[1]
visits = warm.call("visits", Signal.new("counter.increment", {"by": 2}), timeout=10)
_, _, test_x, test_y = digits_split()
digit = warm.call("digits", predict(test_x[0]), timeout=10)
replies = app.control.broadcast("warmpool_status", destination=[node], reply=True,
                                timeout=5, limit=1)
print(json.dumps({"visits": visits.state["count"], "node": visits.node,
                  "digit": digit.state["last_prediction"]["digit"], "true": int(test_y[0]),
                  "status": replies[0][node]}))
"""


# -- the tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return read_compose()


def test_services_profiles_and_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    rabbitmq = {name for name, service in services.items()
                if "rabbitmq" in service.get("profiles", [])}
    assert default == {"redis", "worker", "flower", "gateway"}
    assert rabbitmq == {"rabbitmq", "worker-rabbitmq", "flower-rabbitmq"}
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["rabbitmq"]["healthcheck"]["test"] == [
        "CMD", "rabbitmq-diagnostics", "-q", "ping"]
    for worker in ("worker", "worker-rabbitmq"):
        check = services[worker]["healthcheck"]["test"]
        assert check[0] == "CMD-SHELL" and "inspect ping -d" in check[1], check
        assert "@$$HOSTNAME" in check[1], check  # the container's own node
        assert services[worker]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["worker-rabbitmq"]["depends_on"]["rabbitmq"]["condition"] == \
        "service_healthy"
    for flower in ("flower", "flower-rabbitmq"):
        environment = services[flower]["environment"]
        assert "FLOWER_BASIC_AUTH" in environment or \
            environment.get("FLOWER_UNAUTHENTICATED_API") == "true"
        assert "/healthcheck" in " ".join(services[flower]["healthcheck"]["test"])
    # Every service runs from the one image built from this repository.
    gateway = services["gateway"]
    assert "WARMPOOL_HTTP_TOKEN" in gateway["environment"]  # not open to every caller
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])
    images = {services[name]["image"] for name in
              ("worker", "flower", "gateway", "worker-rabbitmq", "flower-rabbitmq")}
    assert images == {"celery-warmpool-examples:latest"}
    assert services["flower"]["build"] == services["worker"]["build"]
    assert services["gateway"]["build"] == services["worker"]["build"]


def test_redis_health_check_answers(compose: dict[str, Any]) -> None:
    output = run_health_check(compose["services"]["redis"], process_environment({}))
    assert "PONG" in output


@pytest.mark.rabbitmq
def test_rabbitmq_health_check_answers(compose: dict[str, Any]) -> None:
    assert shutil.which("rabbitmq-diagnostics"), "the RabbitMQ health check needs RabbitMQ"
    run_health_check(compose["services"]["rabbitmq"], process_environment({}))


@pytest.fixture
def clean_databases() -> Iterator[None]:
    for url in ("redis://127.0.0.1:6379/8", "redis://127.0.0.1:6379/9"):
        redis.Redis.from_url(url).flushdb()
    yield


@pytest.mark.integration
@pytest.mark.parametrize("variant", [
    "redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def test_worker_and_flower_commands_start_and_answer(
        variant: str, compose: dict[str, Any], tmp_path: Path,
        clean_databases: None) -> None:
    worker_name, flower_name, port_variable = VARIANTS[variant]
    port = free_port()
    variables = {**os.environ, "WORKER_NAME": f"compose-{uuid.uuid4().hex[:8]}",
                 port_variable: str(port)}
    services = interpolate(compose["services"], variables)
    worker, flower = services[worker_name], services[flower_name]
    node = f"{variables['WORKER_NAME']}{'-rabbitmq' if variant == 'rabbitmq' else ''}@" \
           f"{socket.gethostname()}"
    user, _, password = flower["environment"]["FLOWER_BASIC_AUTH"].partition(":")
    worker_env = process_environment(local_environment(worker))
    flower_env = process_environment(local_environment(flower))

    running_worker = start(worker, worker_env, tmp_path / "worker.log")
    running_flower = start(flower, flower_env, tmp_path / "flower.log")
    try:
        wait_for(lambda: " ready." in running_worker.log(), 60, "worker ready",
                 running_worker)
        assert f"{node} ready." in running_worker.log()
        assert "pong" in run_health_check(worker, worker_env)

        answered = subprocess.run([sys.executable, "-c", CLIENT, node], env=worker_env,
                                  cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert answered.returncode == 0, answered.stderr
        client = json.loads(answered.stdout.strip().splitlines()[-1])
        assert client["visits"] == 2 and client["node"] == node
        assert client["digit"] == client["true"]
        for pool, size in POOLS.items():
            assert client["status"][pool]["size"] == size
            assert client["status"][pool]["state"] == "ready"

        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(f"{base}/healthcheck") == (200, b"OK"), 60,
                 "Flower answering", running_flower)
        run_health_check(flower, flower_env)
        assert http_get(f"{base}/api/workers")[0] == 401  # the API needs the password
        status, body = http_get(f"{base}/api/workers?refresh=1", f"{user}:{password}")
        assert status == 200, body
        workers = json.loads(body)
        assert node in workers, sorted(workers)
        assert set(POOLS) <= set(workers[node]["stats"]["warmpool"])
    finally:
        flower_code = running_flower.stop(15)
        worker_code = running_worker.stop(seconds(worker["stop_grace_period"]))
    assert worker_code == 0, running_worker.log()
    assert "Warm shutdown" in running_worker.log()
    assert flower_code is not None, running_flower.log()


@pytest.mark.integration
def test_gateway_command_serves_the_pools_and_answers_its_health_check(
        compose: dict[str, Any], tmp_path: Path, clean_databases: None) -> None:
    port, token = free_port(), uuid.uuid4().hex
    variables = {**os.environ, "WORKER_NAME": f"compose-{uuid.uuid4().hex[:8]}",
                 "GATEWAY_PORT": str(port), "GATEWAY_TOKEN": token}
    services = interpolate(compose["services"], variables)
    worker, gateway = services["worker"], services["gateway"]
    assert "--host 0.0.0.0" in gateway["command"]
    worker_env = process_environment(local_environment(worker))
    gateway_env = process_environment(local_environment(gateway))
    assert gateway_env["WARMPOOL_HTTP_TOKEN"] == token

    running_worker = start(worker, worker_env, tmp_path / "worker.log")
    running_gateway = start(gateway, gateway_env, tmp_path / "gateway.log")
    try:
        wait_for(lambda: " ready." in running_worker.log(), 60, "worker ready",
                 running_worker)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(f"{base}/healthz")[0] == 200, 60, "the gateway answering",
                 running_gateway)
        run_health_check(gateway, gateway_env)
        call = f"{base}/pools/visits/call"
        increment = {"type": "counter.increment", "data": {"by": 3}}
        assert http_get(call, body=increment)[0] == 401  # the token is needed
        status, body = http_get(call, bearer=token, body=increment)
        assert status == 200, body
        assert json.loads(body)["state"]["count"] == 3
    finally:
        gateway_code = running_gateway.stop(seconds(gateway["stop_grace_period"]))
        running_worker.stop(seconds(worker["stop_grace_period"]))
    # uvicorn ends by raising the SIGTERM it handled again, once it has shut down.
    assert gateway_code in (0, -signal.SIGTERM), running_gateway.log()
    assert "Application shutdown complete." in running_gateway.log()
