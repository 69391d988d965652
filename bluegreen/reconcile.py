"""Reconciliation: after a start (a crash, an upgrade, a reboot), or a deployment that failed
past its switch, adopt what systemd runs.

Each app on its own: its units are told apart by the app their settings name, and nothing
here touches another app's. Exactly one deployment's instances of the app may serve: the newest
deployment with a forwarder target (a forwarder unit, or a server of haproxy's that takes
requests) whose instance runs. Its running instances are kept, with or without a forwarder
(app.instances > 1: one being restarted has none until it is healthy again). Every other
target of the app is drain-stopped, every other instance (with its socket) and the workers of
every other release stopped, and deployments a dead controller left running are recorded as
interrupted. A switch-back the controller did not finish (switchback.py) is finished: the
deployment it was retiring is not kept while the release it went back to has a forwarder target.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from bluegreen import drainflag, instances, ports, switchback, workers
from bluegreen.config import DEFAULT_APP, Config, Forwarder
from bluegreen.forwarders import control
from bluegreen.history import History, HistoryError
from bluegreen.log import MessageId, fields
from bluegreen.release import appenv, procfile, transient
from bluegreen.release.releases import Releases
from bluegreen.serving import Serving
from bluegreen.systemd import Systemd, SystemdError

log = logging.getLogger(__name__)


def mark_interrupted(history: History) -> None:
    try:
        interrupted = history.mark_interrupted("the controller stopped during this deployment")
    except HistoryError as exc:
        log.error("%s; interrupted deployments stay marked running for now", exc)
        interrupted = []
    for record in interrupted:
        log.warning("deployment %d was interrupted (the controller stopped at step %s)", record.id,
                    record.steps[-1].step if record.steps else "resolve",
                    extra=fields(deployment_id=record.id, release=record.commit))


async def read_back(systemd: Systemd, run_dir: Path, forwarders: control.Forwarders,
                    config: Config) -> tuple[Serving | None, list[int]]:
    """After a failure that may have moved the traffic: what serves (see adopt), alone, and
    which of its instances the public port does not reach."""
    serving = await adopt(systemd, run_dir, config.app_name)
    await settle(systemd, run_dir, serving, forwarders, config)
    return serving, await adopt_pool(systemd, run_dir, serving, config)


async def clean_up(systemd: Systemd, run_dir: Path, serving: Serving | None,
                   forwarders: control.Forwarders, config: Config, releases: Releases) -> list[int]:
    """The start-up's clean-up once ``serving`` is adopted: stop what must not run, settle the
    builds a dead controller left, drop unfinished releases. Return the serving instances the
    public port does not reach."""
    await settle(systemd, run_dir, serving, forwarders, config)
    out = await adopt_pool(systemd, run_dir, serving, config)
    await transient.settle_orphans(systemd, config.app_name, config.release.timeout)
    releases.remove_incomplete()  # once no build writes into them
    return out


async def adopt_pool(systemd: Systemd, run_dir: Path, serving: Serving | None,
                     config: Config) -> list[int]:
    """Start the serving release's missing workers; return its instances no forwarder target
    of the public port reaches."""
    if serving is None:
        return []
    await adopt_workers(systemd, run_dir, serving, config)
    targets = await control.targets(systemd, run_dir, config.app_name)
    return [port for port in serving.ports if not targets.get(port)]


async def adopt_workers(systemd: Systemd, run_dir: Path, serving: Serving, config: Config) -> None:
    """Start the serving release's workers that do not run (a controller that died between
    the switch and the workers step left them unstarted)."""
    env = instances.read_app_environment(run_dir, serving.port)
    release_dir = env.get("BLUEGREEN_RELEASE_DIR", "")
    if not release_dir:
        return
    try:
        wanted = procfile.processes(Path(release_dir), config.release.migrate_command,
                                    config.processes).workers
    except procfile.ProcfileError as exc:
        log.error("workers of %s not adopted: %s", serving.release[:12], exc)
        return
    app = config.app_name
    running = {w.name for w in await workers.listing(systemd, run_dir, app)
               if w.port == serving.port and w.state.startswith(("active", "activating"))}
    missing = {name: command for name, command in wanted.items() if name not in running}
    if missing:
        log.warning("starting the workers %s of the serving release %s", ", ".join(missing),
                    serving.release[:12])
        await workers.start(systemd, run_dir, serving.port, missing, env, config.app.network, app)


async def running_instances(systemd: Systemd, run_dir: Path, app: str) -> dict[int, dict[str, str]]:
    """The app's running instances: each one's port and settings (its instances/PORT.env)."""
    running = await ports.of_units(systemd, (instances.PATTERN,), running_only=True)
    envs = {port: instances.read_env(run_dir, port) for port in running}
    return {port: env for port, env in envs.items() if instances.app_named(env) == app}


async def adopt(systemd: Systemd, run_dir: Path, app: str = DEFAULT_APP) -> Serving | None:
    """What serves the app, as systemd runs it (see choose). Changes nothing."""
    # Normally one target per instance of the serving release, more when the controller died
    # during a switch or a switch-back.
    targets = await control.targets(systemd, run_dir, app)
    running = await running_instances(systemd, run_dir, app)
    retiring = switchback.retiring(run_dir, app)
    serving = choose(targets, running, retiring)
    if retiring and serving is not None and _deployment_of(running[serving.port]) != retiring:
        log.warning("finishing the switch-back from deployment %d: %s stays", retiring,
                    serving.release[:12], extra=fields(deployment_id=retiring,
                                                       release=serving.release))
    return serving


def choose(targets: Mapping[int, bool], running: Mapping[int, Mapping[str, str]],
           retiring: int = 0) -> Serving | None:
    """The running instances of the newest deployment whose instance a forwarder target new
    connections reach (``targets``: each target's port, with whether it takes new connections)
    runs; ``running``: each running instance's settings. The instances of deployment
    ``retiring`` (a switch-back's) come last: kept only when nothing else is reached."""
    live = [port for port, taking in targets.items() if taking and port in running]
    if not live:
        return None
    staying = [port for port in live if _deployment_of(running[port]) != retiring] if retiring else live
    first = max(staying or live, key=lambda port: _deployment_of(running[port]))
    newest, release = _deployment_of(running[first]), running[first].get("BLUEGREEN_RELEASE", "")
    keep = [port for port, env in running.items() if newest and _deployment_of(env) == newest
            and env.get("BLUEGREEN_RELEASE", "") == release] or [first]
    return Serving.of(keep, release)


def _deployment_of(env: Mapping[str, str]) -> int:
    value = env.get("BLUEGREEN_DEPLOYMENT_ID", "0")
    return int(value) if value.isdigit() else 0


async def settle(systemd: Systemd, run_dir: Path, serving: Serving | None,
                 forwarders: control.Forwarders, config: Config) -> None:
    """Leave only ``serving`` of the app: drain-stop every other forwarder target of it, stop
    its every other instance and the workers of its every other release."""
    keep = serving.ports if serving is not None else ()
    app = config.app_name
    targets = await control.targets(systemd, run_dir, app)
    running = await running_instances(systemd, run_dir, app)
    # A controller that died during a switch may leave a kept forwarder still starting: let it
    # finish (joining its start job) before the others stop listening.
    kept_forwarders = [control.unit(port, kind) for port in keep for kind in Forwarder]
    for status in await systemd.list_units(*kept_forwarders) if kept_forwarders else []:
        if status.active_state == "activating":
            await systemd.start_unit(status.name)
    for port in targets:
        if port not in keep:
            log.warning("stopping the stale forwarder to port %d", port, extra=fields(port=port))
            try:
                await forwarders.drain(port, config)
            except control.ForwarderError as exc:
                log.error("the stale forwarder to port %d is not stopped: %s", port, exc)
    for port in running:
        if port not in keep:
            log.warning("stopping the orphaned instance on port %d", port,
                        extra=fields(unit=instances.unit(port), port=port))
            await instances.stop(systemd, port)
            instances.remove_env(run_dir, port)
    # The socket of an instance that does not run (the controller died between starting the
    # two, or systemd gave up restarting it) holds its port for nothing, and would start the
    # instance again at the next connection.
    for port in await ports.of_units(systemd, (instances.SOCKET_PATTERN,), running_only=True):
        if port not in keep and port not in running and (
                instances.app_named(instances.read_env(run_dir, port)) == app):
            log.warning("closing the socket of the stopped instance on port %d", port,
                        extra=fields(unit=instances.socket_unit(port), port=port))
            await instances.stop(systemd, port)
            instances.remove_env(run_dir, port)
    await workers.stop(systemd, run_dir, keep=serving.port if serving is not None else None, app=app)
    switchback.clear(run_dir, app)  # what serves is settled: no switch-back is under way
    if serving is None:
        return
    for port in serving.ports:  # it may have been draining when the controller stopped
        drainflag.clear(run_dir, port)
    await _give_secrets(systemd, run_dir, serving, app)
    log.info("adopted release %s serving on %s", serving.release[:12], serving.describe(),
             extra=fields(message_id=MessageId.RECONCILED, release=serving.release,
                          port=serving.port))


async def _give_secrets(systemd: Systemd, run_dir: Path, serving: Serving, app: str) -> None:
    """Give the kept units their secrets' drop-ins: a unit started by an older version has
    none, and would start again without its secrets when systemd restarts it."""
    kept = [instances.unit(port) for port in serving.ports]
    kept += [worker.unit for worker in await workers.listing(systemd, run_dir, app)
             if worker.port == serving.port]
    for unit in kept:
        try:
            await appenv.give_secrets(systemd, unit, app)
        except (SystemdError, OSError) as exc:
            log.error("%s will not have its secrets if it restarts: %s", unit, exc,
                      extra=fields(unit=unit))
