"""python tests/helpers/ray_node.py --address 127.0.0.1:PORT --node-ip 127.0.0.2 --num-cpus 1 --temp-dir DIR

A Ray worker node joined to a head on loopback, blocking until it is stopped: what `ray start --address ... --block`
starts, through the same `ray._private.node.Node` that `ray start` and `ray.cluster_utils.Cluster` use. Not the CLI
itself: `ray start` replaces a loopback head address by the machine's external one (services.
resolve_ip_for_localhost), where a head kept on loopback does not listen. Each node gets its own 127.0.0.x address,
so Ray Train sees distinct nodes (node_rank, local_rank) as it would on separate hosts.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True, help="the head's GCS host:port")
    parser.add_argument("--node-ip", required=True)
    parser.add_argument("--num-cpus", type=int, default=1)
    parser.add_argument("--num-gpus", type=int, default=0)
    parser.add_argument("--resources", default="{}", help="custom resources as JSON")
    parser.add_argument("--temp-dir", required=True)
    args = parser.parse_args()

    import ray._private.node
    import ray._private.services
    from ray._private.parameter import RayParams

    params = RayParams(
        gcs_address=args.address,
        node_ip_address=args.node_ip,
        node_name=args.node_ip,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        resources=json.loads(args.resources),
        temp_dir=args.temp_dir,
        object_store_memory=150 * 2**20,
        dashboard_agent_listen_port=None,  # a free port: the head's agent holds the default one
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    ray._private.services.wait_for_node(args.address, node.plasma_store_socket_name, 60)
    print(f"node up: {node.node_id}", flush=True)
    while not node.dead_processes():
        time.sleep(1)
    raise SystemExit(f"node processes died: {node.dead_processes()}")


if __name__ == "__main__":
    main()
