"""Where a run's workers go on a Ray cluster of several nodes: joining it, placement groups, the trainer ranks'
rendezvous, and the check that the run folder is storage every node sees.

Imported only by rlkit.runtime.cluster (the wiring module); each function takes the `ray` module it uses. What a
node runs for us (`node_address`, `see_token`) is a plain function made remote here, pinned to its node.

Placement follows Ray's own pattern (as verl and OpenRLHF do): one placement group per worker group, its bundles
reserved together before any actor starts, so a group starts whole or the run stops in one line naming it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any, Callable

from rlkit.recipe import ClusterConfig, RecipeError

PROBE_TIMEOUT_S = 120.0  # a node's probe task must start (a fresh Python worker) and answer within this
RENDEZVOUS_TRIES = 3  # a group's ranks start again on a new port when theirs was taken before rank 0 bound it

log = logging.getLogger(__name__)


def init_ray(ray, c: ClusterConfig, cpus_wanted: float) -> None:
    """Join the cluster cluster.address names (else RAY_ADDRESS, which `ray job submit` sets), taking its resources
    as they are; with neither, start a Ray on this machine advertising `cpus_wanted` (at least its core count)."""
    address = c.address or os.environ.get("RAY_ADDRESS", "")
    runtime_env = dict(c.runtime_env) or None  # applies to every actor of the run (their env_vars merge into it)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # The actors mostly wait on one another, so oversubscribing a small machine is what we want.
        ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus_wanted + 0.999)), include_dashboard=False,
                 runtime_env=runtime_env)


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    """One worker's reservation; resources it does not ask for are left out (Ray refuses zero entries).

    >>> bundle(0.5, 0.0), bundle(1, 1)
    ({'CPU': 0.5}, {'CPU': 1, 'GPU': 1})
    """
    return {key: value for key, value in (("CPU", cpus), ("GPU", gpus)) if value > 0}


def placement_error(what: str, count: int, one: dict, strategy: str, timeout_s: float, free: dict,
                    nodes: int) -> str:
    """The one line a group that could not be placed fails with.

    >>> print(placement_error("trainer group (cluster.trainer_ranks)", 2, {"GPU": 1}, "pack", 300, {"CPU": 4.0}, 2))
    cluster: could not place the trainer group (cluster.trainer_ranks): 2 x {'GPU': 1} with strategy pack, not
    placed within 300 s; the cluster's 2 node(s) have free CPU 4, GPU 0; ask for less, add nodes, or raise
    cluster.placement_timeout_s
    """
    have = ", ".join(f"{key} {free.get(key, 0):g}" for key in ("CPU", "GPU"))
    return (f"cluster: could not place the {what}: {count} x {one} with strategy {strategy}, not placed within "
            f"{timeout_s:g} s; the cluster's {nodes} node(s) have free {have}; ask for less, add nodes, or raise "
            "cluster.placement_timeout_s")


def room_error(what: str, count: int, cpus: float, node_cpus: list[float], fix: str) -> str | None:
    """The one line a group of `count` workers of `cpus` CPUs each (each on one node) fails with at once when the
    cluster's nodes (`node_cpus`, their total CPUs) could never hold it, whatever else runs; None when they could.
    A shortfall of free CPUs is left to `place`, which waits for them.

    >>> print(room_error("reward scorers", 3, 2, [4.0, 1.0], "lower it"))  # 4 // 2 + 1 // 2 = 2 < 3
    cluster: the reward scorers cannot fit: 3 x {'CPU': 2} but the cluster's nodes have CPU 4, 1 (room for 2);
    lower it
    >>> room_error("reward scorers", 2, 2, [4.0], "lower it") is None
    True
    """
    room = sum(int(n // cpus) for n in node_cpus) if cpus > 0 else count
    if room >= count:
        return None
    have = ", ".join(f"{n:g}" for n in node_cpus)
    return f"cluster: the {what} cannot fit: {count} x {bundle(cpus, 0)} but the cluster's nodes have CPU {have} " \
           f"(room for {room}); {fix}"


def node_cpus(ray) -> list[float]:
    """The total CPUs of each live node of the cluster."""
    return [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n["Alive"]]


def place(ray, what: str, count: int, one: dict[str, float], strategy: str, timeout_s: float):
    """A placement group of `count` bundles `one`, reserved whole, or a RecipeError naming `what`. None when a
    worker asks for no resources (nothing to reserve)."""
    if not one:
        return None
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([dict(one) for _ in range(count)], strategy=strategy.upper())
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        free, nodes = ray.available_resources(), sum(n["Alive"] for n in ray.nodes())
        remove_placement_group(group)
        raise RecipeError(placement_error(what, count, one, strategy, timeout_s, free, nodes)) from None
    return group


def in_bundle(group, index: int) -> dict[str, Any]:
    """Actor options that put a worker in bundle `index` of `group` (none without a group)."""
    if group is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)}


def on_node(node_id: str) -> dict[str, Any]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def bundle_node(ray, group, index: int) -> str | None:
    """The node id bundle `index` of a ready group is reserved on (None without a group: any node)."""
    if group is None:
        return None
    from ray.util.placement_group import placement_group_table

    return placement_group_table(group)["bundles_to_node_id"][index]


def node_address() -> tuple[str, int]:
    """This node's IP (the one Ray's other nodes reach it by) and a port free on it now."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def rendezvous(ray, group) -> dict[str, str]:
    """MASTER_ADDR/MASTER_PORT for a group's ranks: rank 0's node (bundle 0) and a port free there, found on that
    node before any rank starts. Never 127.0.0.1 on a cluster: a rank on another node would dial its own loopback."""
    node = bundle_node(ray, group, 0)
    options = on_node(node) if node else {"num_cpus": 0}
    ip, port = ray.get(ray.remote(node_address).options(**options).remote(), timeout=PROBE_TIMEOUT_S)
    return {"MASTER_ADDR": ip, "MASTER_PORT": str(port)}


def port_taken(text: str) -> bool:
    """Whether a rank failed to start because another process took its rendezvous port between the probe that found
    it free and rank 0's bind (torch's TCPStore: "... code: -98, name: EADDRINUSE, message: address already in use").
    """
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def start_ranks(ray, group, start: Callable[[dict[str, str]], list]) -> list:
    """A group's ranks, `start(env)` -> their actor handles given the rendezvous `env` (MASTER_ADDR/MASTER_PORT),
    once every rank has started (joined the process group). A port found free on rank 0's node may be taken by
    another process before rank 0 binds it: the ranks are then stopped and started again on a new port, at most
    RENDEZVOUS_TRIES times in all. Any other failure of a rank stops them all and is raised at once."""
    attempt = 1
    while True:  # at most RENDEZVOUS_TRIES times
        env = rendezvous(ray, group)
        handles = start(env)
        pending = [h.__ray_ready__.remote() for h in handles]
        try:
            while pending:  # one at a time: a failed rank is seen at once, not after the others time out
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
            return handles
        except ray.exceptions.RayActorError as e:
            for handle in handles:
                ray.kill(handle)
            if attempt >= RENDEZVOUS_TRIES or not port_taken(str(e)):
                raise
            attempt += 1
            log.warning("rendezvous port %s on %s was taken before rank 0 bound it; starting the ranks again on "
                        "another (try %d of %d)", env["MASTER_PORT"], env["MASTER_ADDR"], attempt, RENDEZVOUS_TRIES)


def see_token(folder: str, name: str, token: str) -> tuple[str, str, str]:
    """On one node: read the driver's token file in `folder` and write this node's own beside it. Returns the node's
    IP, its hostname, and what went wrong ("" when the node sees the folder)."""
    import ray

    ip, host, path = ray.util.get_node_ip_address(), socket.gethostname(), Path(folder) / name
    try:
        if path.read_text() != token:
            return ip, host, f"'{path}' holds another run's token"
        (Path(folder) / f"{name}.{ip}").write_text(token)
    except OSError as e:
        return ip, host, f"cannot read '{path}' there ({e.strerror or type(e).__name__})"
    return ip, host, ""


def check_shared_storage(ray, folder: Path) -> None:
    """Every node of the cluster reads a token file the driver wrote in `folder` (logging.output_dir) and writes its
    own back, which the driver must then see; a node that cannot fails the run in one line naming it. Runs before
    any worker starts. The token files are removed either way."""
    name = f".rlkit-storage-{secrets.token_hex(6)}"
    token = secrets.token_hex(16)
    (folder / name).write_text(token)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        probe = ray.remote(see_token)
        answers = ray.get([probe.options(**on_node(n["NodeID"])).remote(str(folder), name, token) for n in nodes],
                          timeout=PROBE_TIMEOUT_S)
        for ip, host, problem in answers:
            back = folder / f"{name}.{ip}"
            if not problem and not (back.exists() and back.read_text() == token):
                problem = f"the token file it wrote ('{back.name}') never reached the driver's node"
            if problem:
                raise RecipeError(f"logging.output_dir: node {ip} ({host}) does not see '{folder}': {problem}; put "
                                  "the run folder on storage every node mounts at the same path (NFS, Lustre, ...)")
    finally:
        for path in folder.glob(f"{name}*"):
            path.unlink(missing_ok=True)
