#!/bin/sh
# Run a command in the network namespace of `unshare --net`: a fresh one whose only device is lo.
#   unshare --net tests/cluster/netns.sh python -m pytest tests/cluster
# Every server the cluster tests start (moto, slurmctld, slurmd, Ray) is then reachable on loopback only,
# whatever address it binds (Slurm binds 0.0.0.0 and has no option to do otherwise).
# 127.0.0.2 is added because glibc's getaddrinfo(AI_ADDRCONFIG), which Slurm uses to resolve even
# "127.0.0.1" and its own listening address, returns no IPv4 address while the only one configured is
# 127.0.0.1 (getaddrinfo(3): "The loopback address is not considered for this case as valid as a configured
# address"); without it slurmctld dies with "slurm_set_addr: Unable to resolve".
set -eu
ip link set lo up
ip addr add 127.0.0.2/8 dev lo
exec "$@"
