""" "An application in a second": a web + db pair in one compartment with the web's port published,
from `bulkhead apply -f` (the real CLI) to the first HTTP 200 that carries the db's answer, side by side
with the same two containers started by hand with `podman run -d` (db first, web given the db's
address) and the same curl loop.

Set-up as tests/e2e/test_make_run.py (whose image, document and helpers it uses): a fake internet
(network namespaces and a bridge this bench makes and removes), host "r" running `make run` (embedded
SQLite and Redis, as the README's quick start, host networking on, uplink up0) in its namespace, the
`webdb:1` image imported through the API once. Podman runs in host "p", a namespace of its own on the
same internet (its CNI bridge and rules stay in there), image loaded once (warm).

Each round, ours: `bulkhead apply --yes -f app.yaml` in host r; from its start, `curl -s -m 1` from the
internet namespace to r's uplink address and published port, every 10 ms, until the body is the db's
answer. Then (not timed) `bulkhead apply` of an empty document removes it all and the bench waits until
the port no longer answers and the workloads are gone. Podman: from the start of `podman run -d` of the
db, `podman inspect` of its address, `podman run -d --add-host db:<address> -p 24080:8080` of the web,
the same curl loop against p's uplink address; then `podman rm -f -t 0` of both (not timed). The two
take turns round by round.

Run (root; podman, curl; no services needed):
    flock /tmp/bulkhead-heavy.lock .venv/bin/python bench/bench_app_second.py [--runs 5]
Prints one JSON line. With BENCH_TRACE=1, each of our rounds also prints (stderr) its operations' created,
started and finished times in ms from the CLI's start, and every curl try that was not refused (its
start, duration, connect and first-byte times, the body's start): how a stalled try was found.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

from tests.e2e.test_make_run import (  # noqa: E402
    DB_ANSWER,
    DOCUMENT,
    PUBLISHED_PORT,
    Session,
    enter,
    sweep_stack,
    webdb_archive,
)
from tests.network.nettopo import Internet, new_token  # noqa: E402

EMPTY_DOCUMENT = "apiVersion: bulkhead/v1\nkind: TenantConfig\nmetadata: {name: demo}\nspec: {}\n"
PODMAN_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
PODMAN_IMAGE = "localhost/webdb:1"


def curl_until_answer(
    internet_netns: str, url: str, timeout: float = 60.0, tries_log: list[str] | None = None
) -> int:
    """The same loop for both: curl from the internet until the body is the db's answer; tries made.

    With ``tries_log`` (BENCH_TRACE) each try is noted: its start (ms from the loop's), duration, curl's
    exit code and connect/first-byte times, and the body's start."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    tries = 0
    timing = ["-w", "\n%{time_connect} %{time_starttransfer}"] if tries_log is not None else []
    while True:
        tries += 1
        at = time.perf_counter()
        answer = subprocess.run(
            [*enter(internet_netns), "curl", "-s", "-m", "1", *timing, url], capture_output=True, text=True
        )
        body = answer.stdout
        if tries_log is not None:
            body, _, times = body.rpartition("\n")
            took = (time.perf_counter() - at) * 1000
            tries_log.append(
                f"{(at - started) * 1000:6.0f} +{took:4.0f} rc={answer.returncode}"
                f" connect/first byte {times} body {body.strip()[:30]!r}"
            )
        if answer.returncode == 0 and body.strip() == DB_ANSWER:
            return tries
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer in {timeout} s: {answer.stdout[:200]!r}")
        time.sleep(0.01)


def port_closed(internet_netns: str, url: str) -> bool:
    answer = subprocess.run(
        [*enter(internet_netns), "curl", "-s", "-m", "1", url], capture_output=True, text=True
    )
    return answer.stdout.strip() != DB_ANSWER


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(interval)


class Ours:
    def __init__(self, internet: Any, work: Path) -> None:
        self.internet = internet
        self.host = internet.add_host("r")
        self.work = work
        self.data_dir = ROOT / "var" / f"bench-app-second-{self.host.netns}"
        self.env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("DATABASE_URL", "REDIS_URL") and not key.startswith(("DJANGO", "BULKHEAD_"))
        }
        self.env.update(
            BULKHEAD_DATA_DIR=str(self.data_dir), BULKHEAD_HOST_NETWORK="on", BULKHEAD_UPLINK="up0"
        )
        self.url = f"http://{self.host.uplink_address.ip}:{PUBLISHED_PORT}/cgi-bin/answer"
        self.make: subprocess.Popen[bytes] | None = None
        self.trace = False

    def start(self) -> None:
        log_path = self.work / "make-run.log"
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.make = subprocess.Popen(
                [*enter(self.host.netns), "make", "run"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        login_line = re.compile(r"Operator login: admin / password (\S+)")
        running = wait_for(
            lambda: login_line.search(log_path.read_text(errors="replace")), 300, "make run's login line", 0.5
        )
        session = Session(self.host.netns)

        def answering() -> Any:
            try:
                return session.request("GET", "/login/")
            except Exception:
                return None

        wait_for(answering, 60, "the portal to answer")
        signed_in = session.request(
            "POST",
            "/login/",
            data={
                "username": "admin",
                "password": running.group(1),
                "csrfmiddlewaretoken": session.http.cookies["csrftoken"],
            },
        )
        assert signed_in.status_code == 302, signed_in.text[:300]
        tenants = session.request("GET", "/api/v1/tenants/").json()["results"]
        demo = next(tenant for tenant in tenants if tenant["name"] == "demo")
        created = session.request("POST", "/api/v1/tokens/", json={"name": "bench", "tenant": demo["id"]})
        assert created.status_code == 201, created.text
        self.token = created.json()["secret"]
        self.session = session
        archive = webdb_archive(self.work / "webdb.tar")
        with open(archive, "rb") as upload:
            imported = session.request(
                "POST",
                "/api/v1/images/import/",
                data={"name": "webdb", "tag": "1", "tenant": demo["id"]},
                files={"archive": ("webdb.tar", upload, "application/x-tar")},
                headers={"Authorization": f"Bearer {self.token}"},
            )
        assert imported.status_code == 202, imported.text
        operation = imported.json()["id"]

        def finished() -> Any:
            op = session.request("GET", f"/api/v1/operations/{operation}/").json()
            return op if op["state"] in ("succeeded", "failed", "cancelled") else None

        assert wait_for(finished, 120, "the image import", 0.3)["state"] == "succeeded"
        (self.work / "app.yaml").write_text(DOCUMENT)
        (self.work / "empty.yaml").write_text(EMPTY_DOCUMENT)

    def apply(self, document: str) -> subprocess.CompletedProcess[str]:
        cli_env = {**self.env, "BULKHEAD_URL": "http://127.0.0.1:8000", "BULKHEAD_TOKEN": self.token}
        applied = subprocess.run(
            [*enter(self.host.netns), str(ROOT / ".venv/bin/bulkhead"), "apply", "--yes", "-f", document],
            cwd=self.work,
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert applied.returncode == 0, applied.stdout + applied.stderr
        return applied

    def round(self) -> dict[str, float]:
        wall0 = time.time()
        t0 = time.perf_counter()
        self.apply("app.yaml")
        applied = time.perf_counter() - t0
        tries_log: list[str] | None = [] if self.trace else None
        tries = curl_until_answer(self.internet.netns, self.url, tries_log=tries_log)
        total = time.perf_counter() - t0
        if tries_log is not None:
            self.print_trace(wall0, applied, total)
            tries_log = [line for line in tries_log if "rc=7" not in line]  # refused: not interesting
            print("\n".join(f"    curl {line}" for line in tries_log), file=sys.stderr, flush=True)
        # Not timed: remove it all for the next round.
        self.apply("empty.yaml")
        wait_for(lambda: port_closed(self.internet.netns, self.url), 60, "the port to close")
        wait_for(lambda: not self.workloads(), 120, "the workloads to go")
        return {"total": total, "apply": applied, "tries": tries}

    def print_trace(self, wall0: float, applied: float, total: float) -> None:
        """BENCH_TRACE: the round's operations (ms from the CLI's start), to see where the time goes."""
        from datetime import datetime

        def ms(stamp: str | None) -> str:
            if not stamp:
                return "-"
            return f"{(datetime.fromisoformat(stamp.replace('Z', '+00:00')).timestamp() - wall0) * 1000:.0f}"

        listed = self.session.request(
            "GET", "/api/v1/operations/", params={"page_size": 20},
            headers={"Authorization": f"Bearer {self.token}"},
        ).json()["results"]  # fmt: skip
        lines = [f"round: cli {applied * 1000:.0f} ms, answer {total * 1000:.0f} ms"]
        for op in sorted(listed, key=lambda op: op["created_at"]):
            if float(ms(op["created_at"])) < -50:
                continue
            lines.append(
                f"  {op['kind']:<24} {op['target_label'][:16]:<16} created {ms(op['created_at']):>5}"
                f" started {ms(op['started_at']):>5} finished {ms(op['finished_at']):>5} {op['state']}"
            )
        print("\n".join(lines), file=sys.stderr, flush=True)

    def workloads(self) -> list[Any]:
        listed = self.session.request(
            "GET", "/api/v1/workloads/", headers={"Authorization": f"Bearer {self.token}"}
        )
        return list(listed.json()["results"])

    def stop(self) -> None:
        if self.make is not None and self.make.poll() is None:
            os.killpg(self.make.pid, signal.SIGINT)  # Ctrl-C, as a user stops make run
            try:
                self.make.wait(timeout=240)
            except subprocess.TimeoutExpired:
                os.killpg(self.make.pid, signal.SIGKILL)
                self.make.wait()
        sweep_stack(self.host.netns, self.data_dir)
        shutil.rmtree(self.data_dir, ignore_errors=True)


class Podman:
    def __init__(self, internet: Any, work: Path) -> None:
        self.internet = internet
        self.host = internet.add_host("p")
        self.work = work
        self.url = f"http://{self.host.uplink_address.ip}:{PUBLISHED_PORT}/cgi-bin/answer"
        self.suffix = self.host.netns[-8:]

    def podman(self, *args: str) -> str:
        # In p's namespace only (not `ip netns exec`, which remounts /sys and hides the cgroups from
        # runc): CNI's bridge and rules are made in there, never in the machine's namespace.
        done = subprocess.run(
            [*enter(self.host.netns), "podman", *args], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    def start(self) -> None:
        archive = self.work / "webdb.tar"
        if not archive.exists():
            webdb_archive(archive)
        self.podman("load", "-q", "-i", str(archive))

    def round(self) -> dict[str, float]:
        db, web = f"bht-db-{self.suffix}", f"bht-web-{self.suffix}"
        t0 = time.perf_counter()
        self.podman(
            "run",
            "-d",
            "--name",
            db,
            *PODMAN_FLAGS,
            PODMAN_IMAGE,
            "/bin/httpd",
            "-f",
            "-p",
            "7000",
            "-h",
            "/db",
        )
        address = self.podman("inspect", "-f", "{{.NetworkSettings.IPAddress}}", db)
        self.podman(
            "run", "-d", "--name", web, *PODMAN_FLAGS, "--add-host", f"db:{address}",
            "-p", f"{PUBLISHED_PORT}:8080", PODMAN_IMAGE, "/bin/httpd", "-f", "-p", "8080", "-h", "/www",
        )  # fmt: skip
        started = time.perf_counter() - t0
        tries = curl_until_answer(self.internet.netns, self.url)
        total = time.perf_counter() - t0
        self.podman("rm", "-f", "-t", "0", web, db)
        return {"total": total, "podman_runs": started, "tries": tries}

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.podman("rm", "-f", "-t", "0", f"bht-db-{self.suffix}", f"bht-web-{self.suffix}")
        subprocess.run(["podman", "rmi", "-f", PODMAN_IMAGE], capture_output=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (finally) when terminated
    from compute.network.netns import delete_netns
    from compute.runtimes.libvirtd import ensure_libvirtd

    ensure_libvirtd()  # the machine's libvirtd, which make run finds and reuses
    work = ROOT / "var" / f"bench-app-second-work-{os.getpid()}"
    work.mkdir(mode=0o755)
    internet = Internet(new_token())
    ours, podman = Ours(internet, work), Podman(internet, work)
    ours.trace = os.environ.get("BENCH_TRACE") == "1"
    figures: dict[str, Any] = {
        "bench": "app_second",
        "runs": options.runs,
        "loadavg_start": os.getloadavg()[0],
    }
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "podman": []}
    try:
        ours.start()
        podman.start()
        ours.round()  # warm-up of both (first apply of the compartment, first CNI set-up)
        podman.round()
        for _ in range(options.runs):
            runs["ours"].append(ours.round())
            runs["podman"].append(podman.round())
    finally:
        podman.stop()
        ours.stop()
        internet.remove()
        for host in (ours.host, podman.host):
            delete_netns(host.netns)
        shutil.rmtree(work, ignore_errors=True)

    def median(side: str, key: str) -> float:
        return round(statistics.median(run[key] for run in runs[side]), 3)

    figures.update(
        {
            "bulkhead_apply_to_db_answer_s_median": median("ours", "total"),
            "bulkhead_apply_to_db_answer_s": [round(run["total"], 3) for run in runs["ours"]],
            "bulkhead_apply_cli_s_median": median("ours", "apply"),
            "podman_run_to_db_answer_s_median": median("podman", "total"),
            "podman_run_to_db_answer_s": [round(run["total"], 3) for run in runs["podman"]],
            "podman_run_commands_s_median": median("podman", "podman_runs"),
            "ratio_vs_podman": round(median("ours", "total") / median("podman", "total"), 2),
            "goal": "<= 1 s and <= 1.0x podman",
            "loadavg_end": os.getloadavg()[0],
        }
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
