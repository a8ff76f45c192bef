"""`make run` end to end, as the README says, on a machine of its own: a network namespace with an uplink
to a fake internet, host networking on. A tenant deploys a web + db app with the `bulkhead` CLI and a
YAML document; the internet reaches the web workload's published port, which answers with what the db
workload said (by name, inside their compartment). Ctrl-C then leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pyroute2 import netns as pyroute2_netns

from compute.network.netns import delete_netns
from tests.imaging.images import Entry, build_image, busybox_layers, make_layer, write_docker_archive
from tests.network.nettopo import Internet, new_token
from tests.processes import wait_until

ROOT = Path(__file__).resolve().parents[2]
PORTAL = "http://127.0.0.1:8000"
PUBLISHED_PORT = 24080
DB_ANSWER = "the db says 42"

CGI_SCRIPT = b"""#!/bin/sh
echo "Content-Type: text/plain"
echo
/bin/wget -q -O - http://db:7000/answer.txt
"""

DOCUMENT = f"""\
apiVersion: bulkhead/v1
kind: TenantConfig
metadata: {{name: demo}}
spec:
  networks:
    - name: app
  workloads:
    - name: db
      image: webdb:1
      isolation: namespace
      command: [/bin/httpd, -f, -p, "7000", -h, /db]
      networks: [app]
    - name: web
      image: webdb:1
      isolation: namespace
      command: [/bin/httpd, -f, -p, "8080", -h, /www]
      networks: [app]
  ports:
    - workload: web
      port: 8080
      host_port: {PUBLISHED_PORT}
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="make run with host networking needs root")


def webdb_archive(path: Path) -> Path:
    """One busybox image that is both: httpd with a CGI script (web) and httpd with a file (db)."""
    applets = {f"bin/{name}": Entry(symlink="busybox") for name in ("httpd", "wget")}
    app = {
        "www/cgi-bin/answer": Entry(CGI_SCRIPT, mode=0o755),
        "db/answer.txt": Entry(f"{DB_ANSWER}\n".encode()),
    }
    image = build_image([*busybox_layers("webdb"), make_layer(applets), make_layer(app)])
    return write_docker_archive(image, path, repo_tag="webdb:1")


def enter(netns: str) -> list[str]:
    """Run a command in `netns` only. (`ip netns exec` would also remount /sys, hiding the cgroup
    mounts from runc: a real host's agent sees its cgroups.)"""
    return ["nsenter", f"--net=/run/netns/{netns}"]


@contextlib.contextmanager
def inside(netns: str) -> Iterator[None]:
    """Sockets opened by this thread meanwhile belong to `netns` (the portal listens on its loopback)."""
    pyroute2_netns.pushns(netns)
    try:
        yield
    finally:
        pyroute2_netns.popns()


def netns_inode(netns: str) -> int:
    return os.stat(f"/run/netns/{netns}").st_ino


def processes_in(inode: int) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.stat(proc / "ns" / "net").st_ino == inode:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:120]
                found.append(f"{proc.name} {command!r}")
        except OSError:
            continue
    return found


def processes_of_stack(data_dir: Path) -> list[int]:
    """Every process started with this stack's data dir in its environment (its children, whatever
    session or namespace they run in)."""
    marker = f"BULKHEAD_DATA_DIR={data_dir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def cgroups_named(name: str) -> set[str]:
    return {str(path) for path in Path("/sys/fs/cgroup").glob(f"*/{name}")}


def libvirt_domains() -> set[str]:
    listed = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True)
    return {line for line in listed.stdout.decode().split() if line}


class Session:
    """A signed-in browser session on the portal (inside the host namespace)."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.http = httpx.Client(base_url=PORTAL, timeout=60)

    def request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        with inside(self.netns):
            headers = {"X-CSRFToken": self.http.cookies.get("csrftoken", ""), "Referer": PORTAL + "/"}
            headers.update(kwargs.pop("headers", {}))  # type: ignore[arg-type]
            return self.http.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]


def test_it_serves_a_web_and_db_app_deployed_with_the_cli_and_stops_clean(tmp_path: Path) -> None:
    from compute.runtimes.libvirtd import ensure_libvirtd

    ensure_libvirtd()  # the machine's libvirtd, which make run finds and reuses
    domains_before = libvirt_domains()
    netns_before = set(os.listdir("/run/netns"))
    token = new_token()
    internet = Internet(token)
    host = internet.add_host("r")
    # Not under pytest's tmp (0700): a user-namespaced container's root must traverse to its rootfs.
    data_dir = ROOT / "var" / f"test-make-run-{token}"
    env = {
        key: value
        for key, value in os.environ.items()
        # A user's shell: none of the test run's own settings (other tests may have exported some).
        if key not in ("DATABASE_URL", "REDIS_URL") and not key.startswith(("PYTEST", "DJANGO", "BULKHEAD_"))
    }
    env.update(BULKHEAD_DATA_DIR=str(data_dir), BULKHEAD_HOST_NETWORK="on", BULKHEAD_UPLINK="up0")
    log_path = tmp_path / "make-run.log"
    with open(log_path, "wb") as log:
        make = subprocess.Popen(
            [*enter(host.netns), "make", "run"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal gives it: Ctrl-C reaches it all
        )
    try:
        login_line = re.compile(r"Operator login: admin / password (\S+)")
        running = wait_until(
            lambda: login_line.search(log_path.read_text(errors="replace")),
            timeout=300,
            interval=0.5,
            what="make run to print the operator's login",
        )
        password = running.group(1)
        session = Session(host.netns)
        login_page = wait_until(lambda: _answering(session), timeout=60, what="the portal to answer")
        assert login_page.status_code == 200
        signed_in = session.request(
            "POST",
            "/login/",
            data={
                "username": "admin",
                "password": password,
                "csrfmiddlewaretoken": session.http.cookies["csrftoken"],
            },
        )
        assert signed_in.status_code == 302, signed_in.text[:300]
        tenants = session.request("GET", "/api/v1/tenants/").json()["results"]
        demo = next(tenant for tenant in tenants if tenant["name"] == "demo")
        created = session.request("POST", "/api/v1/tokens/", json={"name": "e2e", "tenant": demo["id"]})
        assert created.status_code == 201, created.text
        api_token = created.json()["secret"]

        archive = webdb_archive(tmp_path / "webdb.tar")
        with open(archive, "rb") as upload:
            imported = session.request(
                "POST",
                "/api/v1/images/import/",
                data={"name": "webdb", "tag": "1", "tenant": demo["id"]},
                files={"archive": ("webdb.tar", upload, "application/x-tar")},
                headers={"Authorization": f"Bearer {api_token}"},
            )
        assert imported.status_code == 202, imported.text
        operation = imported.json()["id"]
        finished = wait_until(
            lambda: _finished(session, operation), timeout=120, interval=0.3, what="the image import"
        )
        assert finished["state"] == "succeeded", finished

        document = tmp_path / "tenant.yaml"
        document.write_text(DOCUMENT)
        cli_env = {**env, "BULKHEAD_URL": PORTAL, "BULKHEAD_TOKEN": api_token}
        cli = str(ROOT / ".venv/bin/bulkhead")
        applied = subprocess.run(
            [*enter(host.netns), cli, "apply", "--yes", "-f", document.name],
            cwd=tmp_path,
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert applied.returncode == 0, applied.stdout + applied.stderr

        url = f"http://{host.uplink_address.ip}:{PUBLISHED_PORT}/cgi-bin/answer"
        answer = wait_until(
            lambda: _fetch_from(internet.netns, url), timeout=60, interval=0.5, what="the published port"
        )
        assert answer.strip() == DB_ANSWER

        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C
        make.wait(timeout=240)
        inode = netns_inode(host.netns)
        assert processes_in(inode) == [], "processes left in the host namespace"
        assert processes_of_stack(data_dir) == [], "processes of the stack left"
        bridges = subprocess.run(
            ["ip", "-n", host.netns, "-o", "link", "show", "type", "bridge"], capture_output=True, text=True
        )
        assert bridges.stdout.strip() == "", bridges.stdout
        tables = subprocess.run(
            ["ip", "netns", "exec", host.netns, "nft", "list", "tables"], capture_output=True, text=True
        )
        assert tables.stdout.strip() == "", tables.stdout
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        mounts = [line for line in mountinfo if str(data_dir) in line]
        assert mounts == []
        assert set(os.listdir("/run/netns")) - netns_before - {host.netns, internet.netns} == set()
        stack_cgroups = cgroups_named(_local_host_cgroup(data_dir))
        assert stack_cgroups == set(), stack_cgroups
        assert libvirt_domains() - domains_before == set()
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGINT)
            try:
                make.wait(timeout=240)
            except subprocess.TimeoutExpired:
                os.killpg(make.pid, signal.SIGKILL)
                make.wait()
        sweep_stack(host.netns, data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
        internet.remove()
        delete_netns(host.netns)
        if sys.exc_info()[0] is not None:
            print(log_path.read_text(errors="replace")[-6000:])


def sweep_stack(netns: str, data_dir: Path) -> None:
    """After a failure: kill what this stack left (in its namespace and its host's cgroups), unmount its
    data dir and remove its containers' namespaces, so that a rerun starts clean."""
    victims = set(processes_of_stack(data_dir))
    if Path(f"/run/netns/{netns}").exists():
        victims |= {int(entry.split()[0]) for entry in processes_in(netns_inode(netns))}
    if (data_dir / "bulkhead.sqlite3").exists():
        for procs in Path("/sys/fs/cgroup").glob(f"*/{_local_host_cgroup(data_dir)}/*/cgroup.procs"):
            victims |= {int(pid) for pid in procs.read_text().split()}
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        mount_point = line.split()[4]
        if mount_point.startswith(str(data_dir)):
            subprocess.run(["umount", "-l", mount_point], check=False)
    for bundle in data_dir.glob("hosts/*/containers/bh-*"):
        if Path(f"/run/netns/{bundle.name}").exists():
            delete_netns(bundle.name)


def _answering(session: Session) -> httpx.Response | None:
    try:
        return session.request("GET", "/login/")
    except httpx.TransportError:
        return None


def _finished(session: Session, operation: str) -> dict[str, object] | None:
    op = session.request("GET", f"/api/v1/operations/{operation}/").json()
    return op if op["state"] in ("succeeded", "failed", "cancelled") else None


def _fetch_from(netns: str, url: str) -> str | None:
    with inside(netns):
        try:
            response = httpx.get(url, timeout=3)
        except httpx.TransportError:
            return None
    return response.text if response.status_code == 200 else None


def _local_host_cgroup(data_dir: Path) -> str:
    """The cgroup parent of this stack's host `local` (bulkhead-<first 12 hex of its id>)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(data_dir / "bulkhead.sqlite3")) as db:
        (host_id,) = db.execute("SELECT id FROM compute_host WHERE name = 'local'").fetchone()
    return f"bulkhead-{str(host_id).replace('-', '')[:12]}"
