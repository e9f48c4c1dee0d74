"""A team's tracking stack for tests: a real PostgreSQL in a temp folder and a real `mlflow server`.

`postgres(folder)` runs `initdb` + `pg_ctl start` on a free loopback port and yields a
`Postgres` that makes databases and their SQLAlchemy URIs; `mlflow_team_server(...)` runs
`mlflow server` on such a database with proxied artifacts (`--serve-artifacts
--artifacts-destination`), optionally with MLflow's basic auth. Both stop their processes when
the block ends, also when a test fails. PostgreSQL refuses to run as root, so under root (CI,
containers) its commands run as the `postgres` user on a folder it owns.
"""

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from conftest import free_port, wait_until_serving

MLFLOW = Path(sys.executable).parent / "mlflow"


def postgres_bin() -> Path:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if not versions:
        raise RuntimeError("PostgreSQL not found: apt-get install postgresql (or put pg_ctl on PATH)")
    return Path(versions[-1]).parent


@dataclass
class Postgres:
    port: int
    user: str
    bin: Path

    def create_database(self, name: str) -> str:
        """Create database `name` (idempotent: a team server restarts on an existing one); return its URI."""
        exists = self._psql("-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip()
        if exists != "1":
            self._psql("-c", f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def uri(self, name: str) -> str:
        # psycopg 3 through SQLAlchemy 2: MLflow's store and its auth app both accept this form.
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"

    def _psql(self, *args: str) -> str:
        command = [
            str(self.bin / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            self.user,
            "-d",
            "postgres",
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


def _as_postgres_user() -> dict:
    """subprocess arguments that drop root to the `postgres` user; nothing when not root."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": pwd.getpwnam("postgres").pw_gid}


@contextlib.contextmanager
def postgres(user: str = "retrain"):
    """A throwaway PostgreSQL cluster on a free loopback port, removed afterwards.

    Trust authentication: it listens on 127.0.0.1 only and lives for one test module. The folder
    is made with mkdtemp, not pytest's tmp_path, because the `postgres` user cannot enter root's
    0700 pytest folders.
    """
    bin_dir, drop = postgres_bin(), _as_postgres_user()
    folder = Path(tempfile.mkdtemp(prefix="retrain-pg-"))
    if drop:
        shutil.chown(folder, "postgres", "postgres")
    data, log, port = folder / "data", folder / "postgres.log", free_port()

    def run(*command: str) -> None:
        done = subprocess.run(
            [str(bin_dir / command[0]), *command[1:]], capture_output=True, text=True, timeout=120, **drop
        )
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stderr.strip()[-2000:]} (log: {log})")

    try:
        run("initdb", "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync")
        # fsync off: a test cluster need not survive a power cut, and it makes migrations fast.
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        run("pg_ctl", "start", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options)
        yield Postgres(port, user, bin_dir)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w"],
                capture_output=True,
                timeout=60,
                **drop,
            )
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def mlflow_team_server(backend_uri: str, folder: Path, auth: dict | None = None, workers: int = 2):
    """`mlflow server` on backend_uri with artifacts proxied from folder/artifacts; yields its URI.

    auth={"admin": name, "password": pw, "database": uri} turns on `--app-name basic-auth`, with the
    admin bootstrapped from MLflow's environment variables and users kept in that database.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), folder / "server.log"
    command = [
        str(MLFLOW),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--backend-store-uri",
        backend_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        str(folder / "artifacts"),
    ]
    # No background job runner: its consumer processes are for GenAI features, and CPU is scarce here.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if auth:
        config = folder / "basic_auth.ini"
        config.write_text(
            f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {auth['database']}\n"
            f"admin_username = {auth['admin']}\n"
        )
        # The auth app's CSRF protection signs with this key; every worker must share it.
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(config),
            MLFLOW_AUTH_ADMIN_PASSWORD=auth["password"],
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32),
        )
        command += ["--app-name", "basic-auth"]
    process = subprocess.Popen(
        command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )  # its own group: gunicorn's workers go with it
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{uri}/health", process, log, timeout_s=180)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
