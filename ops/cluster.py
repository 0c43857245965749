"""A local Herald cluster: 3 nats-servers (JetStream, one cluster), 3 Herald nodes (R3 stream), nginx in front,
and 2 webhook dispatchers (sharing the work queue) posting to HERALD_HOOKS_URL, else to a local sink that
writes what it receives to DIR/logs/webhooks.jsonl.

``python -m ops.cluster start|stop|status [--dir DIR] [--base-port N]``. Configs are rendered from
config/nats/node.conf.in and ops/nginx/ into DIR/conf (DIR: .cluster/ in the repo), PIDs go to DIR/pids/*.pid,
logs to DIR/logs/. ``--base-port N`` moves every port: LB N, nodes N+1..N+3, NATS clients N+4..N+6, routes
N+7..N+9, monitoring N+10..N+12. Secrets: HERALD_JWT_SECRET, HERALD_PUBLISH_KEY, HERALD_ADMIN_KEY, else dev values.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from broker.embedded import free_port, nats_server_binary
from gateway.auth import mint_token
from gateway.cli import DEV_ADMIN_KEY, DEV_PUBLISH_KEY, DEV_SECRET

ROOT = Path(__file__).resolve().parent.parent
NATS_TEMPLATE = ROOT / "config" / "nats" / "node.conf.in"
NGINX_DIR = ROOT / "ops" / "nginx"
HOST = "127.0.0.1"
DEV_HOOKS_SECRET = "herald-dev-hooks-secret"
DISPATCHERS = 2
NAMES = ("n1", "n2", "n3")
Triple = tuple[int, int, int]


@dataclass(frozen=True)
class Ports:
    lb: int = 8080
    nodes: Triple = (8081, 8082, 8083)
    nats: Triple = (4222, 4223, 4224)
    routes: Triple = (6222, 6223, 6224)
    monitor: Triple = (8222, 8223, 8224)

    @classmethod
    def from_base(cls, base: int | None) -> Ports:
        """All 13 ports from ``base`` on; None: the defaults."""
        if base is None:
            return cls()
        return cls(base, *((b, b + 1, b + 2) for b in range(base + 1, base + 13, 3)))

    @property
    def nats_urls(self) -> str:
        return ",".join(f"nats://{HOST}:{p}" for p in self.nats)


def render_nats(i: int, ports: Ports = Ports()) -> str:
    """Server ``i`` (0-2) of config/nats/node.conf.in; the defaults give config/nats/n<i+1>.conf."""
    routes = "\n".join(f"    nats-route://{HOST}:{p}" for k, p in enumerate(ports.routes) if k != i)
    values = {"NAME": NAMES[i], "CLIENT_PORT": ports.nats[i], "CLUSTER_PORT": ports.routes[i], "ROUTES": routes}
    values["MONITOR_PORT"] = ports.monitor[i]
    return re.sub(r"@([A-Z_]+)@", lambda m: str(values[m[1]]), NATS_TEMPLATE.read_text())


def render_nginx(ports: Ports = Ports()) -> dict[str, str]:
    """ops/nginx/nginx.conf and herald.conf with this cluster's ports (the files hold the defaults)."""
    default = Ports()
    pairs = zip((default.lb, *default.nodes), (ports.lb, *ports.nodes), strict=True)
    moves = {f"{HOST}:{a}": f"{HOST}:{b}" for a, b in pairs}
    pattern = re.compile("|".join(re.escape(k) + r"\b" for k in moves))
    herald = pattern.sub(lambda m: moves[m[0]], (NGINX_DIR / "herald.conf").read_text())
    return {"nginx.conf": (NGINX_DIR / "nginx.conf").read_text(), "herald.conf": herald}


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        raise SystemExit("cluster: nginx not found (make cluster-deps installs it)")
    return found


def herald_command() -> list[str]:
    exe = Path(sys.executable).parent / "herald"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gateway"]


def alive(pid: int) -> bool:
    """Running, and not a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def ours(name: str, pid: int) -> bool:
    """The pid still names the process we started (not a reused pid)."""
    marker = {"nginx": "nginx", "node": "herald", "nats": "nats-server", "hooks": "herald", "sink": "webhook_sink"}[
        name.rstrip("0123456789")
    ]
    try:
        return alive(pid) and marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


class Cluster:
    def __init__(self, directory: Path) -> None:
        self.dir = directory.resolve()
        self.pids, self.logs, self.conf = self.dir / "pids", self.dir / "logs", self.dir / "conf"

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        (self.pids / f"{name}.pid").write_text(f"{proc.pid}\n")
        return proc

    def spawn_node(self, i: int, ports: Ports, env: dict[str, str]) -> subprocess.Popen[bytes]:
        own = {"HERALD_HTTP_PORT": str(ports.nodes[i]), "HERALD_NODE_ID": f"node{i + 1}"}
        return self.spawn(f"node{i + 1}", [*herald_command(), "serve"], env | own)

    def node_ready(self, i: int, proc: subprocess.Popen[bytes], ports: Ports, env: dict[str, str], t: float) -> None:
        url, log = f"http://{HOST}:{ports.nodes[i]}/readyz", self.logs / f"node{i + 1}.log"
        for attempt in (1, 2, 3):
            try:
                return wait_http(url, proc, log, t)
            except Exited as exc:
                if attempt == 3:
                    raise
                print(f"{exc}\ncluster: starting node{i + 1} again", file=sys.stderr)
                proc = self.spawn_node(i, ports, env)

    def recorded(self) -> list[tuple[str, int]]:  # (name, pid) from the pid files
        return [(f.stem, int(f.read_text().split()[0])) for f in sorted(self.pids.glob("*.pid"))]

    def running(self) -> list[tuple[str, int]]:
        return [(n, p) for n, p in self.recorded() if ours(n, p)]

    def start(self, base: int | None, timeout: float) -> None:
        if self.running():
            raise SystemExit(f"cluster: already running in {self.dir} (python -m ops.cluster stop --dir {self.dir})")
        self._make_dirs()
        try:
            started = self._start(base, Ports.from_base(base), timeout)
        except BaseException:
            self.stop(5.0)
            raise
        print(started)

    def _make_dirs(self) -> None:
        for sub in (self.pids, self.logs, self.conf, self.dir / "tmp"):
            sub.mkdir(parents=True, exist_ok=True)

    def start_nats(self, ports: Ports, timeout: float) -> dict[str, subprocess.Popen[bytes]]:
        """The 3 nats-servers (by name: n1, n2, n3), once JetStream has a meta leader with all of them."""
        self._make_dirs()
        nats, procs = nats_server_binary(), {}
        for i, name in enumerate(NAMES):
            (conf := self.conf / f"{name}.conf").write_text(render_nats(i, ports))
            (store := self.dir / "data" / name).mkdir(parents=True, exist_ok=True)
            env = os.environ | {"NATS_STORE_DIR": str(store)}
            procs[name] = self.spawn(f"nats{i + 1}", [nats, "-c", str(conf)], env)
        for i, port in enumerate(ports.monitor):
            wait_http(f"http://{HOST}:{port}/healthz", procs[NAMES[i]], self.logs / f"nats{i + 1}.log", timeout)
        wait_meta(ports, timeout)
        return procs

    def node_env(self, ports: Ports) -> dict[str, str]:
        """What every node runs with: this environment, the secrets (else the dev ones), the 3 nats-servers."""
        shared = os.environ | secrets_from_env() | {"HERALD_NATS_URLS": ports.nats_urls, "HERALD_STREAM_REPLICAS": "3"}
        if "HERALD_JWT_SECRET" not in os.environ:  # the demo page signs in by name, as with `herald dev`
            shared.setdefault("HERALD_HTTP_DEV_TOKENS", "true")
        return shared

    def _start(self, base: int | None, ports: Ports, timeout: float) -> str:
        began = time.monotonic()
        self.start_nats(ports, timeout)
        secrets, dev = secrets_from_env(), "HERALD_JWT_SECRET" not in os.environ
        shared = self.node_env(ports)
        # node1 first: nodes creating the R3 stream and KV buckets at the same moment fail ("no response
        # from stream", timeouts) and exit, as one may while JetStream settles ("peer offline"): retried.
        for batch in ((0,), (1, 2)):
            nodes = {i: self.spawn_node(i, ports, shared) for i in batch}
            for i, proc in nodes.items():
                self.node_ready(i, proc, ports, shared, timeout)
        for name, text in render_nginx(ports).items():
            (self.conf / name).write_text(text)
        nginx = [nginx_binary(), "-p", f"{self.dir}/", "-c", str(self.conf / "nginx.conf")]
        lb = self.spawn("nginx", [*nginx, "-e", str(self.logs / "nginx-error.log"), "-g", "daemon off;"])
        wait_http(f"http://{HOST}:{ports.lb}/readyz", lb, self.logs / "nginx-error.log", timeout)
        hooks = self._start_dispatchers(shared, timeout)
        (self.dir / "cluster.json").write_text(json.dumps({"base_port": base}) + "\n")
        took = time.monotonic() - began
        return (
            f"Herald cluster up in {took:.1f}s ({self.dir})\n{summary(ports, secrets, dev)}\n  webhooks:      {hooks}"
        )

    def _start_dispatchers(self, shared: dict[str, str], timeout: float) -> str:
        """Two dispatchers on one work queue (each message goes to one of them), posting to
        HERALD_HOOKS_URL / _ROUTES, else to a local sink; each ready once it consumes (/readyz)."""
        env = shared | {"HERALD_HOOKS_SECRET": shared.get("HERALD_HOOKS_SECRET") or DEV_HOOKS_SECRET}
        if not (env.get("HERALD_HOOKS_URL") or env.get("HERALD_HOOKS_ROUTES")):
            port, out = free_port(), self.logs / "webhooks.jsonl"
            sink = [sys.executable, "-m", "ops.webhook_sink", "--port", str(port), "--out", str(out)]
            self.spawn("sink", sink, env)
            env["HERALD_HOOKS_URL"] = f"http://{HOST}:{port}/hook"
            where = f"to a local sink, received ones in {out}"
        else:
            where = f"to {env.get('HERALD_HOOKS_URL') or env.get('HERALD_HOOKS_ROUTES')}"
        ready = []
        for i in range(1, DISPATCHERS + 1):
            port = free_port()
            proc = self.spawn(f"hooks{i}", [*herald_command(), "hooks"], env | {"HERALD_HOOKS_METRICS_PORT": str(port)})
            ready.append((f"http://{HOST}:{port}/readyz", proc, self.logs / f"hooks{i}.log"))
        for url, proc, log in ready:
            wait_http(url, proc, log, timeout)
        return f"{DISPATCHERS} dispatchers posting {where}"

    def stop(self, timeout: float) -> int:
        """SIGTERM by phase (nginx, nodes, NATS: nodes drain while NATS is up), SIGKILL after ``timeout``."""
        running = self.running()
        for phase in ("nginx", "hooks", "node", "sink", "nats"):
            group = [(n, p) for n, p in running if n.startswith(phase)]
            for _, pid in group:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while any(alive(p) for _, p in group) and time.monotonic() < deadline:
                time.sleep(0.1)
            for name, pid in group:
                if alive(pid):
                    print(f"cluster: {name} ({pid}) ignored SIGTERM for {timeout:g}s: SIGKILL", file=sys.stderr)
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for pidfile in self.pids.glob("*.pid"):
            pidfile.unlink()
        return len(running)

    def status(self) -> int:
        recorded = self.recorded()
        if not recorded:
            print(f"cluster: nothing started in {self.dir}")
            return 1
        up = set(self.running())
        for name, pid in recorded:
            print(f"  {name:<6} pid {pid:<8} {'running' if (name, pid) in up else 'not running'}")
        if (info := self.dir / "cluster.json").exists():
            print(summary(Ports.from_base(json.loads(info.read_text())["base_port"])))
        return 0 if len(up) == len(recorded) else 1


def secrets_from_env() -> dict[str, str]:
    dev = {"HERALD_JWT_SECRET": DEV_SECRET, "HERALD_PUBLISH_KEY": DEV_PUBLISH_KEY, "HERALD_ADMIN_KEY": DEV_ADMIN_KEY}
    return {name: os.environ.get(name) or value for name, value in dev.items()}


def summary(ports: Ports, secrets: dict[str, str] | None = None, dev: bool = False) -> str:
    lb = f"http://{HOST}:{ports.lb}"
    lines = [
        f"  load balancer: {lb}/  (ws {lb.replace('http', 'ws', 1)}/ws, sse {lb}/sse, publish {lb}/api/publish)",
        *(f"  node{i + 1}:         http://{HOST}:{p}/  (/metrics)" for i, p in enumerate(ports.nodes)),
        f"  nats:          {ports.nats_urls}",
        "  nats monitor:  " + "  ".join(f"http://{HOST}:{p}/" for p in ports.monitor),
    ]
    if secrets is not None:
        token = mint_token(secrets["HERALD_JWT_SECRET"], "alice", rooms=["*"], publish=["*"], ttl=86400)
        if dev:
            lines.append(f"  publish key:   {secrets['HERALD_PUBLISH_KEY']}   admin key: {secrets['HERALD_ADMIN_KEY']}")
        lines += ["  sample token (user alice, all rooms, 24 h):", f"    {token}"]
        lines.append(f"  try:  curl -N '{lb}/sse?token={token}&room=lobby'")
    return "\n".join(lines)


class Exited(SystemExit):
    """A process we wait for exited."""


def wait_meta(ports: Ports, timeout: float) -> None:
    """Until a JetStream meta leader sees both other servers current (else: "no suitable peers")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for port in ports.monitor:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/jsz", timeout=2) as answer:
                    peers = json.load(answer).get("meta_cluster", {}).get("replicas") or []
            except (OSError, ValueError):
                continue
            if len(peers) == 2 and all(p.get("current") and not p.get("offline") for p in peers):
                return
        time.sleep(0.1)
    raise SystemExit(f"cluster: no JetStream meta leader with all 3 servers within {timeout:g}s")


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Until ``url`` answers 200; fail early (with the log's tail) if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Exited(f"cluster: pid {proc.pid} exited ({proc.returncode}), see {log}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (OSError, http.client.HTTPException) as exc:  # HTTPError (503 ...) included
            last = str(exc)  # BadStatusLine: connected to itself (the port is in the ephemeral range)
        time.sleep(0.1)
    raise SystemExit(f"cluster: {url} not ready within {timeout:g}s ({last}):\n{tail(log)}")


def tail(log: Path, count: int = 15) -> str:
    """The log's last error lines (else its last lines)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return f"({log} unreadable)"
    errors = [line for line in lines if re.search(r"ERROR herald|\[(ERR|FTL|emerg|alert|crit)\]", line)]
    return "\n".join((errors or lines)[-count:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.cluster", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("command", choices=("start", "stop", "status"))
    p.add_argument("--dir", type=Path, default=ROOT / ".cluster", help="state, configs and logs (default .cluster/)")
    p.add_argument("--base-port", type=int, help="LB port; the other 12 follow it (default: 8080, 8081-3, 4222...)")
    p.add_argument("--timeout", type=float, help="start: wait per step (30 s); stop: SIGKILL after (10 s)")
    args = p.parse_args(argv)
    cluster = Cluster(args.dir)
    if args.command == "start":
        cluster.start(args.base_port, args.timeout or 30.0)
        return 0
    if args.command == "stop":
        print(f"cluster: stopped {cluster.stop(args.timeout or 10.0)} processes")
        return 0
    return cluster.status()


if __name__ == "__main__":
    sys.exit(main())
