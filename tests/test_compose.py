"""The deployable platform: docker-compose.yml, platform/ and everything they name.

Docker cannot run on the build machine, so the stack is checked by parsing its files and
by checking that each command, module, URL and variable they name exists in the project;
the web service is started with the environment compose gives it and answers its own
healthcheck and Prometheus' scrape. `docker compose config` runs too where a compose
plugin is installed.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
PLATFORM_DIR = ROOT / "platform"
DOCKERFILE = PLATFORM_DIR / "Dockerfile"
ENTRYPOINT = PLATFORM_DIR / "entrypoint.sh"
PROMETHEUS_CONFIG = PLATFORM_DIR / "prometheus" / "prometheus.yml"
ENV_EXAMPLE = ROOT / ".env.example"

APP_SERVICES = ("web", "worker", "beat", "synapse")
REQUIRED_SERVICES = ("postgres", "redis", *APP_SERVICES, "prometheus", "influxdb")
PRIORITY_QUEUES = ["critical", "high", "normal", "low"]
APP_ENVIRONMENT = (
    "DJANGO_SETTINGS_MODULE",
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "SECRET_KEY",
    "ALLOWED_HOSTS",
    "INFLUXDB_URL",
    "INFLUXDB_TOKEN",
    "INFLUXDB_ORG",
    "INFLUXDB_BUCKET",
    "TRAINING_DATA_DIR",
)
WEB_PORT = 8000
WORKER_METRICS_PORT = 9808

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}; "$$" is
# compose's escape for a literal "$" (for the container's shell) and is no reference.
_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
_BARE_REFERENCE = re.compile(r"(?<!\$)\$(?![{$])(?=[A-Za-z_])")
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|API_KEY|PRIVATE_KEY")
_NOT_SECRETS = {"AGENT_API_KEY_ENV_ALLOWED", "AGENT_API_KEY_HOSTS"}  # names of variables and hosts, not secrets
# Secrets a deployment may go without (an LLM provider it does not use): empty unless set.
_OPTIONAL_SECRETS = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"}
_HIGH_ENTROPY = re.compile(r"[A-Za-z0-9+=_-]{24,}")


# --- helpers ----------------------------------------------------------------------------


def _load_yaml(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        document = yaml.safe_load(handle)
    assert isinstance(document, dict), f"{path.name} is not a YAML mapping"
    return document


def _compose() -> dict[str, Any]:
    return _load_yaml(COMPOSE_FILE)


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _references(text: str) -> Iterator[re.Match[str]]:
    for match in _INTERPOLATION.finditer(text):
        if match["name"]:
            yield match


def _referenced_variables() -> set[str]:
    return {match["name"] for match in _references(COMPOSE_FILE.read_text())}


def _required_variables() -> set[str]:
    return {match["name"] for match in _references(COMPOSE_FILE.read_text()) if (match["op"] or "").endswith("?")}


def _test_variables() -> dict[str, str]:
    """A value for every variable compose requires, as an operator's .env would give."""
    return {name: secrets.token_hex(32) for name in sorted(_required_variables())}


def _interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation, for the forms the compose specification defines."""

    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        value = variables.get(name)
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if op and op.endswith("-"):
            return arg if missing else value
        if op and op.endswith("?"):
            if missing:
                raise KeyError(f"${{{name}}} is required: {arg}")
            return value
        return value or ""

    return _INTERPOLATION.sub(replace, text)


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def _argv(command: str | list[str], variables: Mapping[str, str] | None = None) -> list[str]:
    """A command as its process sees it (string commands are split the way compose does)."""
    variables = {} if variables is None else variables
    if isinstance(command, str):
        return shlex.split(_interpolate(command, variables))
    return [_interpolate(str(part), variables) for part in command]


def _healthcheck_argv(service: Mapping[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    kind, *rest = test
    if kind == "CMD-SHELL":
        return shlex.split(_interpolate(rest[0], {}))
    return _argv(rest)


def _app_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every command an application container runs, healthchecks included."""
    commands = []
    for name in APP_SERVICES:
        service = _services()[name]
        commands.append((f"{name} command", _argv(service.get("command") or [])))
        commands.append((f"{name} healthcheck", _healthcheck_argv(service)))
    return commands


def _entrypoint_web_mode() -> str:
    match = re.search(r"^\s*web(?: \| serve)?\)\n(?P<body>.*?)^\s*;;", ENTRYPOINT.read_text(), re.MULTILINE | re.DOTALL)
    assert match, "platform/entrypoint.sh has no `web)` mode"
    return match["body"]


def _management_commands_named() -> list[tuple[str, str]]:
    named = []
    for where, argv in _app_commands():
        named += [(where, argv[i + 1]) for i, arg in enumerate(argv[:-1]) if arg == "manage.py"]
    named += [("entrypoint web mode", command) for command in re.findall(r"manage\.py\s+(\w+)", _entrypoint_web_mode())]
    return named


def _celery_commands() -> list[tuple[str, list[str]]]:
    return [(where, argv) for where, argv in _app_commands() if argv and argv[0] == "celery"]


def _option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _prometheus_jobs() -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in _load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_process_environment() -> dict[str, str]:
    return {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}


def _app_process_environment(tmp_path: Path) -> dict[str, str]:
    """The environment compose gives the web container, with writable paths on this machine."""
    environment = {
        key: _interpolate(value, _test_variables()) for key, value in _environment(_services()["web"]).items()
    }
    return {
        **_base_process_environment(),
        **environment,
        "VAR_DIR": str(tmp_path / "var"),
        "STATIC_ROOT": str(tmp_path / "static"),
        "TRAINING_DATA_DIR": str(tmp_path / "training"),
    }


def _docker_compose_available() -> bool:
    try:
        result = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


# --- the compose file -------------------------------------------------------------------


def test_compose_file_defines_every_service_of_the_stack():
    missing = sorted(set(REQUIRED_SERVICES) - set(_services()))
    assert not missing, f"docker-compose.yml lacks services: {missing}"


@pytest.mark.parametrize("name", sorted(_services()))
def test_every_service_has_a_healthcheck(name):
    healthcheck = _services()[name].get("healthcheck") or {}
    assert not healthcheck.get("disable"), f"{name}: healthcheck disabled"
    test = healthcheck.get("test")
    assert test, f"{name}: no healthcheck"
    if isinstance(test, list):
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: healthcheck test {test!r}"


def test_app_services_run_one_image_built_from_the_platform_dockerfile():
    services = _services()
    builds = {name: services[name].get("build") for name in APP_SERVICES}
    images = {name: services[name].get("image") for name in APP_SERVICES}
    assert len({json.dumps(build, sort_keys=True) for build in builds.values()}) == 1, builds
    assert len(set(images.values())) == 1 and None not in images.values(), images
    build = builds["web"]
    assert isinstance(build, dict), build
    assert (ROOT / build["context"]).resolve() == ROOT, "the build context is the project root"
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert DOCKERFILE.is_file()
    for name in APP_SERVICES:
        assert "entrypoint" not in services[name], f"{name} bypasses platform/entrypoint.sh"


def test_dockerfile_builds_a_non_root_python_311_image_with_the_requirements():
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    assert re.search(r"pip install .*-r requirements\.txt", dockerfile)
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), f"the image runs as {users[-1] if users else 'root'}"
    entrypoint = re.search(r'^ENTRYPOINT \["/app/(?P<path>[^"]+)"\]', dockerfile, re.MULTILINE)
    assert entrypoint and re.search(r"^WORKDIR /app$", dockerfile, re.MULTILINE)
    assert (ROOT / entrypoint["path"]).resolve() == ENTRYPOINT


@pytest.mark.subprocess
def test_static_files_are_collected_at_build_time_for_the_storage_production_serves_them_from(tmp_path):
    """Production serves static files through whitenoise's manifest storage; files collected
    with another storage have no manifest and every page that links a static file fails."""
    build = re.search(r"DJANGO_SETTINGS_MODULE=(\S+) python manage\.py collectstatic", DOCKERFILE.read_text())
    assert build, "platform/Dockerfile does not run collectstatic with an explicit settings module"
    script = "import importlib, json, sys; print(json.dumps(importlib.import_module(sys.argv[1]).STORAGES))"

    def storages(module: str, environment: dict[str, str]) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, "-c", script, module], cwd=ROOT, env=environment, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{module}: {result.stderr}"
        return json.loads(result.stdout)["staticfiles"]

    # At build time there is no secret, host or database: only the Dockerfile's ENV.
    build_environment = {**_base_process_environment(), "VAR_DIR": str(tmp_path / "build")}
    production = storages("config.settings.production", _app_process_environment(tmp_path))
    assert storages(build[1], build_environment) == production


def _dockerfile_environment() -> dict[str, str]:
    """The ENV the image sets (`ENV A=1 \\ B=2` lines), as every container starts with."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    environment = {}
    for line in re.findall(r"^ENV\s+(.+)$", text, re.MULTILINE):
        environment.update(item.split("=", 1) for item in shlex.split(line))
    return environment


@pytest.mark.subprocess
def test_the_image_runs_production_settings_unless_told_otherwise(tmp_path):
    """platform/README runs the image on further hosts with just the service URLs (any
    orchestrator): without compose's DJANGO_SETTINGS_MODULE it must not fall back to the
    development settings (DEBUG on, a built-in SECRET_KEY, SQLite)."""
    from django.conf import settings

    environment = {
        **_base_process_environment(),
        **_dockerfile_environment(),
        "VAR_DIR": str(tmp_path / "var"),
        "STATIC_ROOT": str(tmp_path / "static"),
        "TRAINING_DATA_DIR": str(tmp_path / "training"),
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/agentledger",
        "REDIS_URL": settings.REDIS_URL,
    }
    script = "from django.conf import settings; print(settings.DEBUG, settings.SETTINGS_MODULE)"
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", script],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0, f"the image started with {result.stdout.strip()}"
    assert "SECRET_KEY must be set" in result.stderr, result.stderr


def test_app_services_get_the_production_environment():
    for name in APP_SERVICES:
        environment = _environment(_services()[name])
        missing = [key for key in APP_ENVIRONMENT if key not in environment]
        assert not missing, f"{name} lacks {missing}"
        assert environment["DJANGO_SETTINGS_MODULE"] == "config.settings.production"


def test_services_start_after_what_they_need_is_healthy():
    services = _services()
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
        for dependency, spec in depends_on.items():
            assert spec.get("condition") == "service_healthy", f"{name} -> {dependency}: {spec}"
            assert services[dependency].get("healthcheck"), f"{name} waits on {dependency}, which has no healthcheck"
    for name in APP_SERVICES:
        assert {"postgres", "redis"} <= set(services[name].get("depends_on") or {}), name
    # beat's DatabaseScheduler and the consumers need the schema web's start-up migrates.
    for name in ("worker", "beat", "synapse"):
        assert "web" in services[name]["depends_on"], name


@pytest.mark.parametrize("name", sorted(_services()))
def test_published_ports_listen_on_loopback_unless_told_otherwise(name):
    """web serves /metrics without authentication and trusts X-Forwarded-Proto: published
    on every interface, both would be reachable around the TLS proxy meant to guard them."""
    for port in _services()[name].get("ports") or []:
        published = _interpolate(str(port), {})
        assert published.startswith("127.0.0.1:"), f"{name} publishes {port!r} on every interface"


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def test_web_is_given_the_time_gunicorn_takes_to_stop_gracefully():
    """On SIGTERM gunicorn lets running requests finish for its graceful timeout; Docker's
    default 10 s grace would SIGKILL them first."""
    from gunicorn.config import Config

    web = _entrypoint_web_mode()
    configured = re.search(r"--graceful-timeout[ =](\d+)", web)
    graceful = int(configured[1]) if configured else Config().graceful_timeout
    assert _seconds(str(_services()["web"].get("stop_grace_period", "10s"))) > graceful


def test_worker_can_be_scaled_to_many_containers():
    worker = _services()["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports"), "a published host port would collide between worker replicas"


def test_training_data_volume_is_shared_by_the_consumer_the_workers_and_beat():
    compose = _compose()
    mounts = {}
    for name in ("synapse", "worker", "beat"):
        service = compose["services"][name]
        training_dir = _environment(service)["TRAINING_DATA_DIR"]
        mounts[name] = [volume for volume in service.get("volumes", []) if volume.split(":")[1] == training_dir]
        assert len(mounts[name]) == 1, f"{name} does not mount a volume at TRAINING_DATA_DIR={training_dir}"
    sources = {mount[0].split(":")[0] for mount in mounts.values()}
    assert len(sources) == 1, sources
    assert sources <= set(compose["volumes"]), "the training data volume is not a named volume"
    for name, data_dir in (("postgres", "/var/lib/postgresql/data"), ("influxdb", "/var/lib/influxdb2")):
        volumes = compose["services"][name].get("volumes", [])
        assert any(v.split(":")[0] in compose["volumes"] and v.split(":")[1] == data_dir for v in volumes), name


def test_influxdb_is_set_up_with_the_org_bucket_and_token_the_app_uses():
    services = _services()
    influxdb, app = _environment(services["influxdb"]), _environment(services["web"])
    assert influxdb["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
    assert influxdb["DOCKER_INFLUXDB_INIT_ORG"] == app["INFLUXDB_ORG"]
    assert influxdb["DOCKER_INFLUXDB_INIT_BUCKET"] == app["INFLUXDB_BUCKET"]
    assert influxdb["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"] == app["INFLUXDB_TOKEN"]
    assert urllib.parse.urlsplit(app["INFLUXDB_URL"]).hostname == "influxdb"


# --- what the commands name exists --------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "command"), [pytest.param(*named, id=f"{named[0]}: {named[1]}") for named in _management_commands_named()]
)
def test_management_commands_named_by_the_platform_exist(where, command):
    from django.core.management import get_commands

    assert command in get_commands(), f"{where} runs `manage.py {command}`, which is no management command"


def test_every_app_service_command_is_recognised():
    """Each app service runs the web mode, manage.py, or celery: what the other tests check."""
    for name in APP_SERVICES:
        argv = _argv(_services()[name].get("command") or [])
        assert argv == ["web"] or argv[:2] == ["python", "manage.py"] or argv[:1] == ["celery"], (name, argv)


@pytest.mark.parametrize(("where", "argv"), [pytest.param(*command, id=command[0]) for command in _celery_commands()])
def test_celery_commands_name_the_project_app_and_an_importable_scheduler(where, argv):
    from celery import Celery
    from celery.app.utils import find_app
    from celery.beat import Scheduler
    from kombu.utils.imports import symbol_by_name

    app_name = _option(argv, "-A", "--app")
    assert app_name, f"{where}: no -A"
    assert isinstance(find_app(app_name), Celery), f"{where}: -A {app_name} finds no Celery app"
    scheduler = _option(argv, "-S", "--scheduler")
    if scheduler:
        assert issubclass(symbol_by_name(scheduler), Scheduler), f"{where}: {scheduler}"


def test_the_worker_consumes_every_priority_queue_and_the_default_queue():
    from celery.app.utils import find_app

    argv = _argv(_services()["worker"]["command"])
    assert argv[:4] == ["celery", "-A", "config", "worker"], argv
    queues = (_option(argv, "-Q", "--queues") or "").split(",")
    assert queues == ["system", *PRIORITY_QUEUES]
    app = find_app("config")
    assert app.conf.task_default_queue in queues, "tasks without a route would wait forever"
    declared = {queue.name for queue in app.conf.task_queues or ()}
    assert declared <= set(queues), f"declared queues nobody consumes: {sorted(declared - set(queues))}"
    assert _option(argv, "--concurrency", "-c"), "worker concurrency is not set"


def test_the_recovery_schedules_have_a_worker_no_user_task_can_occupy():
    """The relay and the reaper go to `system` (migration 0027); worker-system consumes only
    it, so a worker full of hour-long tasks does not stop the Synapse stream or the reaper."""
    argv = _argv(_services()["worker-system"]["command"])
    assert argv[:4] == ["celery", "-A", "config", "worker"], argv
    assert _option(argv, "-Q", "--queues") == "system"
    assert _option(argv, "-n", "--hostname").startswith("system@")
    assert "system@" in " ".join(_services()["worker-system"]["healthcheck"]["test"])


def test_the_beat_uses_the_database_scheduler():
    argv = _argv(_services()["beat"]["command"])
    assert argv[:4] == ["celery", "-A", "config", "beat"]
    assert _option(argv, "-S", "--scheduler") == "config.beat:DatabaseScheduler"


def test_the_entrypoint_web_mode_migrates_and_serves_the_project_wsgi_app():
    import gunicorn.util

    assert ENTRYPOINT.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in ENTRYPOINT.read_text()
    assert os.access(ENTRYPOINT, os.X_OK), "platform/entrypoint.sh is not executable"
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
    web = _entrypoint_web_mode()
    assert "python manage.py migrate --noinput" in web
    served = re.search(r"exec gunicorn (\S+:\S+)", web)
    assert served, "web mode does not exec gunicorn"
    with warnings.catch_warnings():  # whitenoise: no collected static files in this checkout
        warnings.simplefilter("ignore", UserWarning)
        assert callable(gunicorn.util.import_app(served[1]))
    assert re.search(rf"--bind 0\.0\.0\.0:{WEB_PORT}\b", web)
    # A sync worker is killed 30 s into any request: a long export download would end early.
    assert "--worker-class gthread" in web and re.search(r"--threads \d+", web)


def _entrypoint_run(mode: str, tmp_path: Path) -> tuple[list[str], list[str]]:
    """Run the entrypoint in `mode` with no dependency to wait for, and stand-ins for what it
    starts (python's manage.py commands, gunicorn) and for the rm/mkdir of its metrics
    directory: (the manage.py commands it ran, gunicorn's arguments)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(parents=True)
    stand_ins = {
        "python": f'[ "$1" = manage.py ] && {{ echo "manage.py $2" >> {calls}; exit 0; }}\nexec {sys.executable} "$@"',
        "gunicorn": f'echo "gunicorn $*" >> {calls}',
        "rm": "exit 0",
        "mkdir": "exit 0",
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    environment = {**_base_process_environment(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([str(ENTRYPOINT), mode], env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = calls.read_text().splitlines()
    gunicorn = [line.split()[1:] for line in lines if line.startswith("gunicorn ")]
    assert len(gunicorn) == 1, lines
    return [line.split()[1] for line in lines if line.startswith("manage.py ")], gunicorn[0]


@pytest.mark.subprocess
def test_web_containers_beyond_the_first_serve_as_web_does_without_migrating(tmp_path):
    """platform/README (Several hosts): only one process migrates; the other web containers
    serve without. It named the plain `gunicorn config.wsgi:application` for them: sync
    workers, which cut off an export download after 30 s with its 200 already sent, none of
    the web's statement limits, and each process answering /metrics for itself alone. The
    mode it names serves with the web mode's gunicorn and runs no migration."""
    section = (PLATFORM_DIR / "README.md").read_text().split("- **Migrations.**", 1)[1].split("\n- **", 1)[0]
    named = re.search(r"`entrypoint\.sh (\w+)`", section)
    assert named, "platform/README names no entrypoint mode for the web containers beyond the first"
    commands, served = _entrypoint_run(named[1], tmp_path / "further")
    assert commands == []
    web_commands, web_served = _entrypoint_run("web", tmp_path / "first")
    assert web_commands == ["migrate", "load_agents"]
    assert served == web_served
    assert "config.wsgi:application" in served and served[served.index("--worker-class") + 1] == "gthread"


@pytest.mark.subprocess
def test_the_entrypoint_waits_for_reachable_dependencies_then_runs_the_command():
    from django.conf import settings

    environment = {
        **_base_process_environment(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DATABASE_URL": os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
    }
    result = subprocess.run(
        [str(ENTRYPOINT), "python", "-c", "print('ran')"], env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ran\n"
    assert subprocess.run([str(ENTRYPOINT), "check-deps"], env=environment, timeout=60, check=False).returncode == 0


@pytest.mark.subprocess
def test_the_entrypoint_waits_on_the_port_the_clients_connect_to_for_a_tls_redis_url():
    """redis-py and kombu connect a rediss:// URL without a port to 6379, as redis://."""
    from django.conf import settings

    if (urllib.parse.urlsplit(settings.REDIS_URL).port or 6379) != 6379:
        pytest.skip("the test Redis does not listen on the default port")
    environment = {
        **_base_process_environment(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "WAIT_TIMEOUT": "2",
    }
    result = subprocess.run(
        [str(ENTRYPOINT), "python", "-c", "print('ran')"],
        env={**environment, "REDIS_URL": "rediss://127.0.0.1/0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ran\n"


@pytest.mark.subprocess
def test_the_entrypoint_gives_up_on_an_unreachable_dependency_and_names_it():
    environment = {
        **_base_process_environment(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0",
        "WAIT_TIMEOUT": "2",
    }
    started = time.monotonic()
    result = subprocess.run(
        [str(ENTRYPOINT), "python", "-c", "print('ran')"], env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert result.stdout == "", "the command ran although its dependency was unreachable"
    assert "REDIS_URL" in result.stderr
    assert time.monotonic() - started < 30
    check = subprocess.run([str(ENTRYPOINT), "check-deps"], env=environment, capture_output=True, timeout=60)
    assert check.returncode != 0


@pytest.mark.subprocess
@pytest.mark.parametrize("value", ["60s", "abc", "-5", "1.5"])
def test_the_entrypoint_names_a_wait_timeout_that_is_not_a_number_of_seconds(value):
    """bash's arithmetic read WAIT_TIMEOUT: "60s" stopped the container with "value too great for
    base (error token is "60s")", "abc" with "abc: unbound variable", neither naming the
    variable, and "-5" gave up at once, "after -5s"."""
    environment = {
        **_base_process_environment(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0",
        "WAIT_TIMEOUT": value,
    }
    result = subprocess.run(
        [str(ENTRYPOINT), "python", "-c", "print('ran')"], env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr == f"entrypoint: WAIT_TIMEOUT={value!r} is not a whole number of seconds\n"


@pytest.mark.subprocess
def test_the_entrypoint_reads_a_wait_timeout_with_a_leading_zero_as_decimal():
    """ "08" was an octal number to bash's arithmetic, which stopped the container."""
    environment = {
        **_base_process_environment(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0",
        "WAIT_TIMEOUT": "02",
    }
    result = subprocess.run(
        [str(ENTRYPOINT), "python", "-c", "print('ran')"], env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "REDIS_URL" in result.stderr and "gave up after 2s" in result.stderr, result.stderr


# --- variables and secrets ----------------------------------------------------------------


def test_compose_references_variables_only_in_braces():
    text = COMPOSE_FILE.read_text()
    assert not _BARE_REFERENCE.search(text), "use ${NAME} (or $$ for a literal dollar sign)"
    assert _referenced_variables(), "docker-compose.yml references no variable at all"


def test_every_variable_compose_references_is_documented_in_env_example():
    if not ENV_EXAMPLE.exists():
        pytest.skip(f".env.example does not exist yet; compose references {sorted(_referenced_variables())}")
    documented = set(re.findall(r"^[#\s]*([A-Za-z_][A-Za-z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    undocumented = sorted(_referenced_variables() - documented)
    assert not undocumented, f"docker-compose.yml references variables .env.example does not list: {undocumented}"


def test_the_readme_names_every_variable_compose_requires():
    """README's docker compose section says what to put in .env before `docker compose up`:
    it named three of the five variables compose refuses to start without."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## docker compose\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section))
    assert not _required_variables() - named, f"README's docker compose section omits {_required_variables() - named}"


def test_platform_readme_names_every_variable_compose_reads():
    """platform/README lists what an operator may set in .env for compose; it left out
    SYNAPSE_CONSUMER_PROCESSES, which sets how many consumers the synapse service runs."""
    readme = (PLATFORM_DIR / "README.md").read_text()
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", readme))
    assert not _referenced_variables() - named, f"platform/README.md omits {sorted(_referenced_variables() - named)}"


def test_compose_file_holds_no_literal_secrets():
    """Secrets reach the containers only from variables (.env or the shell): required ones,
    or, for an LLM provider's key a deployment may not use, optional ones that are empty
    unless set; never a default value."""
    for match in _references(COMPOSE_FILE.read_text()):
        if _SECRET_NAME.search(match["name"]) and match["name"] not in _NOT_SECRETS:
            required = (match["op"] or "").endswith("?")
            optional = match["name"] in _OPTIONAL_SECRETS and match["op"] in (":-", "-") and not match["arg"]
            assert required or optional, f"${{{match['name']}}} must be required or empty by default"
    variables = _test_variables()
    from_required_variables = set(variables.values())
    for name, service in _services().items():
        assert "env_file" not in service, f"{name}: env_file would pass the whole .env into the container"
        for key, raw in _environment(service).items():
            value = _interpolate(raw, variables)
            if _SECRET_NAME.search(key) and key not in _NOT_SECRETS:
                assert value in from_required_variables or (value == "" and raw == f"${{{key}:-}}"), (
                    f"{name}: {key} is not taken from a variable of its own name"
                )
            password = urllib.parse.urlsplit(value).password if "://" in value else None
            if password:
                assert password in from_required_variables, f"{name}: {key} holds a literal password"
    literals = _INTERPOLATION.sub(" ", COMPOSE_FILE.read_text())
    suspicious = [token for token in _HIGH_ENTROPY.findall(literals) if re.search(r"\d", token)]
    assert not suspicious, f"docker-compose.yml holds secret-looking literals: {suspicious}"


@pytest.mark.subprocess
def test_docker_compose_config_accepts_the_file():
    if not _docker_compose_available():
        pytest.skip("no docker compose plugin on this machine; docker-compose.yml was checked by parsing only")
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        env={**os.environ, **_test_variables()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# --- platform/ is no Python package ------------------------------------------------------


def test_platform_directory_holds_no_python_package():
    assert not list(PLATFORM_DIR.rglob("__init__.py"))
    assert not list(PLATFORM_DIR.rglob("*.py")), "platform/ holds deployment files only"
    assert not (ROOT / "platform.py").exists()


@pytest.mark.subprocess
def test_import_platform_from_the_project_root_gives_the_standard_library_module():
    script = "import platform; print(platform.__file__); print(platform.system())"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=_base_process_environment(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    module_file, system = result.stdout.splitlines()
    assert Path(module_file).parent == Path(sysconfig.get_paths()["stdlib"])
    assert system


# --- Prometheus ---------------------------------------------------------------------------


def test_prometheus_scrapes_the_web_metrics_url_and_the_workers():
    from django.urls import resolve

    jobs = _prometheus_jobs()
    assert {"web", "worker"} <= set(jobs), sorted(jobs)
    web = jobs["web"]
    assert resolve(web.get("metrics_path", "/metrics")).func.__module__ == "observability.views"
    web_targets = [target for config in web["static_configs"] for target in config["targets"]]
    assert web_targets == [f"web:{WEB_PORT}"]
    allowed_hosts = _interpolate(_environment(_services()["web"])["ALLOWED_HOSTS"], _test_variables()).split(",")
    assert "web" in allowed_hosts, "Prometheus' Host header (web) would be refused by Django"
    worker = jobs["worker"]
    ports = {config["port"] for config in worker.get("dns_sd_configs", [])}
    ports |= {int(t.rsplit(":", 1)[1]) for c in worker.get("static_configs", []) for t in c["targets"]}
    assert ports == {WORKER_METRICS_PORT}
    for config in worker.get("dns_sd_configs", []):
        # The scaled worker service is found by its service name, and worker-system's metrics too.
        assert config["names"] == ["worker", "worker-system"]
        assert all(name in _services() for name in config["names"])


def test_prometheus_service_mounts_the_platform_scrape_config():
    volumes = _services()["prometheus"]["volumes"]
    mounted = [v for v in volumes if v.split(":")[1] == "/etc/prometheus/prometheus.yml"]
    assert len(mounted) == 1
    assert (ROOT / mounted[0].split(":")[0]).resolve() == PROMETHEUS_CONFIG


@pytest.mark.subprocess
def test_web_started_as_compose_configures_it_passes_its_healthcheck_and_prometheus_scrape(tmp_path, db):
    """Production settings, loaded from exactly the environment compose gives the web
    container, must accept the healthcheck's and Prometheus' requests (host validation, the
    HTTPS redirect) — a mismatch would leave web unhealthy and everything after it unstarted.
    The healthcheck asks /readyz, so the service addresses are this machine's test servers."""
    from django.conf import settings

    from tests.engine import database_url

    port = _free_port()
    environment = {
        **_app_process_environment(tmp_path),
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
    }
    log = tmp_path / "gunicorn.log"
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "gunicorn", "config.wsgi:application"),
            *("--bind", f"127.0.0.1:{port}", "--workers", "1", "--no-control-socket"),
        ],
        cwd=ROOT,
        env=environment,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, f"gunicorn exited:\n{log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"gunicorn did not listen:\n{log.read_text()}"
                time.sleep(0.2)

        healthcheck = _healthcheck_argv(_services()["web"])
        assert healthcheck[0] == "python" and f"127.0.0.1:{WEB_PORT}" in healthcheck[-1], healthcheck
        healthcheck = [sys.executable, *healthcheck[1:-1], healthcheck[-1].replace(f":{WEB_PORT}", f":{port}")]
        # As compose runs it: a try that fails (the worker's first request imports and connects
        # everything, past the check's 5 s on a loaded machine) is followed by another, up to
        # its `retries`, before the service counts as unhealthy.
        for _ in range(int(_services()["web"]["healthcheck"]["retries"])):
            result = subprocess.run(healthcheck, capture_output=True, text=True, timeout=30)
            if result.returncode == 0:
                break
        assert result.returncode == 0, f"{result.stderr}\n{log.read_text()}"

        # Prometheus sends the target as Host, plus the job's http_headers; no redirect may
        # be involved (it would lead to https://web:8000, which nothing serves).
        job = _prometheus_jobs()["web"]
        headers = {name: spec["values"][0] for name, spec in (job.get("http_headers") or {}).items()}
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", job.get("metrics_path", "/metrics"), headers={"Host": f"web:{WEB_PORT}", **headers})
        response = connection.getresponse()
        body = response.read().decode()
        assert response.status == 200, f"{response.status} {response.getheader('Location')}\n{log.read_text()}"
        assert "django_http_requests_total_by_method_total" in body
    finally:
        server.terminate()
        server.wait(timeout=30)


STATEMENT_LIMITS = ("DATABASE_STATEMENT_TIMEOUT_SECONDS", "DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS")


@pytest.mark.subprocess
def test_a_one_off_command_in_the_web_container_runs_without_the_requests_statement_limits():
    """platform/README.md runs the release's migrations as `docker compose run --rm web python
    manage.py migrate --noinput` (and `docker compose exec web python manage.py ...` for other
    commands): the command gets the web service's environment and goes through the entrypoint's
    generic branch, not its web mode. The limits meant for requests must not reach it: a
    migration that rewrites a big table would be cancelled after 30 s."""
    from django.conf import settings

    web = {key: _interpolate(value, _test_variables()) for key, value in _environment(_services()["web"]).items()}
    environment = {
        **_base_process_environment(),
        **{key: value for key, value in web.items() if key in STATEMENT_LIMITS},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
    }
    script = (
        "import django; django.setup()\n"
        "from django.db import connection\n"
        "with connection.cursor() as c:\n"
        "    c.execute('SHOW statement_timeout'); s = c.fetchone()[0]\n"
        "    c.execute('SHOW idle_in_transaction_session_timeout'); i = c.fetchone()[0]\n"
        "print(s, i)\n"
    )
    result = subprocess.run(
        [str(ENTRYPOINT), "python", "-c", script], env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0"]


def test_the_web_mode_serves_requests_with_the_statement_limits():
    web = _entrypoint_web_mode()
    serve = web[web.index("exec gunicorn") - 400 :]
    assert 'DATABASE_STATEMENT_TIMEOUT_SECONDS="${WEB_STATEMENT_TIMEOUT_SECONDS' in serve
    assert 'DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS="${WEB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS' in serve


def test_every_app_service_knows_the_agents_keys_and_rules():
    """Workers send the keys; web checks new agents against the same rules; and every service
    masks the keys by value: the relay (a worker) and the consumer (synapse) make the same
    training CSV rows only when they know the same keys."""
    for name in ("web", "worker", "worker-system", "beat", "synapse"):
        environment = _environment(_services()[name])
        for key in (
            "OPENAI_API_KEY",
            "ANTHROPIC_API_KEY",
            "AGENT_API_KEY_ENV_ALLOWED",
            "AGENT_HTTP_ALLOWED_HOSTS",
            "AGENT_API_KEY_HOSTS",
            "AGENT_HTTP_ALLOW_PRIVATE",
            "AGENT_ENTRYPOINT_MODULES",
        ):
            assert key in environment, f"{name} lacks {key}"
