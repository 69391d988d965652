"""A throwaway systemd container over the host's root, for integration tests and the demo.

The container is an overlay of / whose writes go to a tmpfs, booted by systemd-nspawn with a
private network namespace (only loopback: its port 5000 clashes with nothing). bluegreen is
installed into it before boot, the way a package would put it there. Everything is torn down
on exit, whatever happened inside.

    with Sandbox() as box:
        box.run("systemctl", "start", "bluegreen")
        box.net("curl", "-s", "http://127.0.0.1:5000/")
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "bluegreen-sandbox-"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Host units that would only slow the container's boot down.
MASKED = ("postgresql.service", "postgresql@.service", "getty@.service", "console-getty.service",
          "cron.service", "ssh.service", "systemd-timesyncd.service", "apt-daily.timer",
          "apt-daily-upgrade.timer", "man-db.timer", "e2scrub_all.timer", "fstrim.timer",
          "logrotate.timer", "exim4.service", "nginx.service", "redis-server.service",
          "memcached.service", "docker.service", "containerd.service", "packagekit.service",
          "haproxy.service", "caddy.service", "caddy-api.service")


class SandboxError(Exception):
    pass


def _python_site() -> str:
    version = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        check=True, capture_output=True, text=True).stdout.strip()
    return f"/usr/local/lib/python{version}/dist-packages"


def install_tree(root: Path, source: Path = ROOT) -> None:
    """Install bluegreen from the source tree into a root file system, as a package would."""

    def put(relative: str, target: str, mode: int = 0o644) -> None:
        destination = root / target.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, destination)
        destination.chmod(mode)

    site = root / _python_site().lstrip("/") / "bluegreen"
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(source / "bluegreen", site,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for unit in sorted((source / "units").iterdir()):
        if unit.suffix != ".conf":
            put(f"units/{unit.name}", f"/usr/local/lib/systemd/system/{unit.name}")
    # The shared drop-ins, where the package links them (copies will do here).
    for line in (source / "packaging/debian/bluegreen.links").read_text().splitlines():
        target, link = line.split()
        put(f"units/{Path(target).name}",
            "/" + link.replace("usr/lib/systemd/system/", "usr/local/lib/systemd/system/"))
    put("data/org.bluegreen1.conf", "/usr/share/dbus-1/system.d/org.bluegreen1.conf")
    put("packaging/debian/bluegreen.sysusers", "/usr/local/lib/sysusers.d/bluegreen.conf")
    put("data/sysctl.d/50-bluegreen.conf", "/usr/local/lib/sysctl.d/50-bluegreen.conf")
    put("data/bluegreen.toml", "/etc/bluegreen/bluegreen.toml")
    put("scripts/bluegreenctl", "/usr/local/bin/bluegreenctl", 0o755)
    put("data/bluegreen-generator", "/usr/local/lib/systemd/system-generators/bluegreen-generator",
        0o755)
    put("data/with-secrets", "/usr/libexec/bluegreen/with-secrets", 0o755)
    put("packaging/debian/bluegreen.tmpfiles", "/usr/local/lib/tmpfiles.d/bluegreen.conf")


class Sandbox:
    def __init__(self, deb: Path | None = None, source: bool = False, keep_noise: bool = False) -> None:
        """Install ``deb`` with apt-get once booted, or (``source``) the source tree before boot."""
        self.name = "bg-" + uuid.uuid4().hex[:8]
        self.deb = deb
        self.source = source
        self.keep_noise = keep_noise
        self.base: Path | None = None
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.boot_seconds = 0.0

    # --- life cycle ------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        assert self.base is not None
        return self.base / "root"

    def __enter__(self) -> Sandbox:
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def boot(self) -> None:
        cleanup_stale()
        self.base = Path(tempfile.mkdtemp(prefix=PREFIX))
        _check(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(self.base)])
        for sub in ("upper", "work", "root"):
            (self.base / sub).mkdir()
        _check(["mount", "-t", "overlay", "overlay", "-o",
                f"lowerdir=/,upperdir={self.base}/upper,workdir={self.base}/work", str(self.root)])
        # A host prepared for image builds may forbid maintainer scripts to start or stop
        # services (policy-rc.d exiting 101); the container plays a real host, where they do.
        (self.root / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
        if not self.keep_noise:
            for unit in MASKED:
                link = self.root / "etc/systemd/system" / unit
                link.unlink(missing_ok=True)
                link.symlink_to("/dev/null")
        if self.source:
            install_tree(self.root)
        self._start()
        if self.deb is not None:
            self.install_deb(self.deb)

    def power_cycle(self) -> None:
        """Cut the power: kill the container's init (and with it every process inside), then
        boot again on the same file system. /run and /tmp start empty, /var keeps its state."""
        assert self.nspawn is not None
        os.kill(self.leader, signal.SIGKILL)
        self.nspawn.wait(timeout=60)
        self._start()

    def reboot(self) -> None:
        """A clean reboot: power off (every unit stopped as on a real host), then boot again on
        the same file system. /run and /tmp start empty, /var keeps its state."""
        assert self.nspawn is not None
        self.run("systemctl", "poweroff", "--no-block")
        self.nspawn.wait(timeout=120)
        self._start()

    def _start(self) -> None:
        assert self.base is not None
        started = time.monotonic()
        with open(self.base / "console.log", "ab") as console:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "--directory", str(self.root), "--register=no",
                 "--keep-unit", "--machine", self.name, "--private-network", "--console=passive",
                 # The forwarder's stop hook copies socat's listener with pidfd_getfd, which
                 # nspawn's own system call filter leaves out (a host has no such filter).
                 "--system-call-filter=pidfd_getfd", "--link-journal=no", "--boot"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True)
        (self.base / "nspawn.pid").write_text(f"{self.nspawn.pid}\n")
        self.leader = self._wait_leader()
        deadline = time.monotonic() + 60
        while not (Path(f"/proc/{self.leader}/root/run/systemd/private")).exists():
            if time.monotonic() > deadline:
                raise SandboxError("the container's systemd never opened its API socket")
            time.sleep(0.02)
        state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=90)
        self.boot_seconds = time.monotonic() - started
        if state.stdout.strip() not in ("running", "degraded"):
            raise SandboxError(f"container did not boot: {state.stdout.strip()}\n{self.console()}")

    def install_deb(self, deb: Path) -> subprocess.CompletedProcess[str]:
        """apt-get install the package; the container's network has nothing to download from,
        so every dependency must already be installed on the host.

        The .deb is copied in first: the host path may lie where the container sees something
        else (its /tmp, say, is a tmpfs of its own)."""
        inside = f"/var/cache/bluegreen-sandbox/{deb.name}"
        self.path(inside).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(deb, self.path(inside))
        return self.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
                        inside, timeout=300)

    def _wait_leader(self) -> int:
        assert self.nspawn is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise SandboxError(f"systemd-nspawn exited: {self.console()}")
            found = subprocess.run(["pgrep", "-P", str(self.nspawn.pid), "-x", "systemd"],
                                   capture_output=True, text=True).stdout.split()
            if found:
                return int(found[0])
            time.sleep(0.02)
        raise SandboxError("the container's init never started")

    def console(self) -> str:
        if self.base is None:
            return ""
        with contextlib.suppress(OSError):
            return (self.base / "console.log").read_text(errors="replace")[-4000:]
        return ""

    def close(self) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait()
        self.nspawn = None
        if self.base is not None:
            _unmount(self.base)
            self.base = None

    # --- doing things inside ---------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 120,
            input: str | None = None, user: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all of its namespaces)."""
        prefix = self.enter()
        if user:
            gid = self._exec([*prefix, "id", "-g", user], True, 30, None).stdout.strip()
            prefix += ["setpriv", f"--reuid={user}", f"--regid={gid}", "--init-groups", "--"]
        return self._exec(prefix + list(argv), check, timeout, input)

    def enter(self) -> list[str]:
        """The argv prefix that runs a command inside, with the environment a unit or a root
        shell there would have (not the caller's: its PATH may point at another Python)."""
        return ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={SYSTEM_PATH}",
                "LANG=C.UTF-8", f"TERM={os.environ.get('TERM', 'dumb')}", "HOME=/root"]

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-c", script, check=check, timeout=timeout)

    def net(self, *argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a host program inside the container's network namespace only."""
        return self._exec(["nsenter", "-t", str(self.leader), "-n", *argv], check, timeout, None)

    def popen_net(self, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start a host program inside the container's network namespace, stdout piped."""
        return subprocess.Popen(["nsenter", "-t", str(self.leader), "-n", *argv], text=True,
                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})

    def _exec(self, argv: list[str], check: bool, timeout: float,
              input: str | None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise SandboxError(f"{shlex.join(argv)} exited {result.returncode}\n"
                               f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}")
        return result

    def exists(self, inside: str) -> bool:
        """Whether a path exists inside (also under /run, /proc and /tmp, which the root file
        system seen by ``path`` does not hold)."""
        return self.run("test", "-e", inside, check=False).returncode == 0

    def path(self, inside: str) -> Path:
        """The host path of a file in the container's root file system (not /run, /proc, /tmp)."""
        return self.root / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def use_wheelhouse(self, wheelhouse: Path, inside: str = "/srv/wheelhouse") -> str:
        """Make pip inside install from a copy of ``wheelhouse`` and nothing else (the container
        has no network). A copy: the host's /var/tmp, where the wheelhouse is built, is hidden
        from every unit with PrivateTmp=. The host's /etc/xdg/pip (constraints) goes too."""
        target = self.path(inside)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(wheelhouse, target, ignore=shutil.ignore_patterns(".*"))
        self.write("/etc/pip.conf", f"[global]\nno-index = true\nfind-links = {inside}\n")
        shutil.rmtree(self.path("/etc/xdg/pip"), ignore_errors=True)
        return inside

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", *args, check=False).stdout


def _check(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise SandboxError(f"{shlex.join(argv)}: {result.stderr.strip()}")


def _unmount(base: Path) -> None:
    for target in (base / "root", base):
        if os.path.ismount(target):
            subprocess.run(["umount", "--lazy", str(target)], capture_output=True)
    with contextlib.suppress(OSError):
        base.rmdir()


def cleanup_stale() -> None:
    """Unmount sandboxes whose container is gone (left by a run that was killed)."""
    for base in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            pid = int((base / "nspawn.pid").read_text())
        except (OSError, ValueError):
            if time.time() - base.stat().st_mtime < 120:
                continue  # another sandbox still booting
            pid = 0
        if pid and Path(f"/proc/{pid}").exists():
            continue
        _unmount(base)


def build_deb(version: str | None = None, run: str | None = None) -> Path:
    """Build the package with scripts/build-deb (lintian included); return the .deb's path.

    Builds wait for each other: two would write the same file in dist/. With ``run`` (the test
    run's id, which every pytest-xdist worker shares), the first worker builds and the others
    take its package, which none of them overwrites while another installs it."""
    dist = ROOT / "dist"
    dist.mkdir(exist_ok=True)
    stamp = dist / f".built-{run}-{version or 'changelog'}"
    with open(dist / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if run is not None and stamp.exists() and (built_before := Path(stamp.read_text())).exists():
            return built_before
        argv = [str(ROOT / "scripts/build-deb"), *(["--version", version] if version else [])]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise SandboxError(
                f"scripts/build-deb failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        built = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("built ")]
        if run is not None:
            for old in dist.glob(".built-*"):
                if not old.name.startswith(f".built-{run}-"):
                    old.unlink(missing_ok=True)
            stamp.write_text(str(ROOT / built[-1]))
        return ROOT / built[-1]


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("the sandbox needs root (mount, systemd-nspawn)")
