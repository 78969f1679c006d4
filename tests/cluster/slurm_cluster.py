"""A real one-host SLURM cluster for tests: Debian's slurmctld and two slurmd (`slurmd -N n1`, `-N n2`).

Everything lives in one folder: slurm.conf, state, spool, logs and the job-completion log. The daemons run
in the foreground (`-D`) as children of the test, never as system services, and are stopped by their pids.

Choices, each because this sandbox (and CI) is one container without systemd or a cgroup hierarchy of its own:
- AuthType=auth/none and CredType=cred/none (both plugins ship in Debian's slurm-wlm 22.05): no munged to
  run, and nothing leaves the host. A real cluster uses auth/munge with one key on every node.
- ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, JobAcctGatherType=jobacct_gather/none: no cgroups
  (https://slurm.schedmd.com/slurm.conf.html lists these as the plugins that need no cgroup support).
- Two node entries on one host with their own ports (slurmd -N picks its entry), so array tasks spread over
  two "nodes" and run concurrently. SlurmdParameters=config_overrides lets each declare the CPUs and memory
  that examples/slurm/shuffle.sbatch requests (8 CPUs, 40G a task), more than this 2-core machine has:
  nothing enforces them without cgroups, and it keeps the shipped script as a real cluster would run it.
- No slurmdbd (it needs MySQL/MariaDB): JobCompType=jobcomp/filetxt logs every finished job, array tasks
  included, and `sacct --completion` reads that log (sacct(1), "-c, --completion").

The daemons listen on every address of their network namespace: Slurm has no bind option. Run them in a
namespace of their own with only the loopback device (`unshare --net`, as `make test-cluster` does through
tests/cluster/netns.sh); `require_loopback_only` refuses to start otherwise.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sacct", "scontrol", "sinfo")
NODES = ("n1", "n2")
ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED")
NODE_CPUS = 16
NODE_MEMORY_MB = 96 * 1024


def require_loopback_only() -> None:
    """Raise unless the only network interface is lo: then whatever binds 0.0.0.0 is reachable on loopback only."""
    names = sorted(name for _, name in socket.if_nameindex())
    if names != ["lo"]:
        raise RuntimeError(f"network interfaces {names}: the SLURM daemons listen on every address, so they run "
                           "only in a network namespace with nothing but lo; use `make test-cluster`, or "
                           "`unshare --net tests/cluster/netns.sh python -m pytest tests/cluster`")


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS if shutil.which(b) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """slurmctld plus one slurmd per entry of NODES, configured in `base`. Use as a context manager."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.conf = self.base / "slurm.conf"
        self.jobcomp = self.base / "jobcomp.txt"
        self.logs = self.base / "log"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: list[subprocess.Popen] = []

    def config(self) -> str:
        user = getpass.getuser()
        b = self.base
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} CPUs={NODE_CPUS} "
            f"RealMemory={NODE_MEMORY_MB} State=UNKNOWN" for n in NODES)
        return f"""\
ClusterName=shufflertest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/none
CredType=cred/none
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd-%n.pid
SlurmctldLogFile={self.logs}/slurmctld.log
SlurmdLogFile={self.logs}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=3600
{nodes}
PartitionName=main Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""

    def __enter__(self) -> SlurmCluster:
        for d in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config())
        try:
            self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
            for n in NODES:
                self._spawn(["slurmd", "-D", "-N", n, "-f", str(self.conf)], f"slurmd-{n}")
            self.wait_idle(60)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _spawn(self, cmd: list[str], name: str) -> None:
        out = open(self.logs / f"{name}.stdout", "wb")  # noqa: SIM115 (closed with the process)
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT))
        out.close()

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for f in sorted(self.logs.glob("*.log")):
            parts.append(f"== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    def run(self, *cmd: str, cwd: Path | None = None, env: dict | None = None, check: bool = True) -> str:
        """A SLURM client command against this cluster; its stdout."""
        r = subprocess.run(list(cmd), env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}\n{self.log_tail()}")
        return r.stdout

    def wait_idle(self, timeout: float) -> None:
        """Until every node reports idle to slurmctld (both slurmd registered)."""
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited at start\n{self.log_tail()}")
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = r.stdout.strip()
            if r.returncode == 0 and sorted(states.splitlines()) == [f"{n} idle" for n in NODES]:
                return
            time.sleep(0.5)
        raise TimeoutError(f"nodes not idle after {timeout}s: {states!r}\n{self.log_tail()}")

    def jobs(self, workdir: Path) -> list[dict]:
        """Jobs submitted from `workdir` (their children too: they inherit it) that slurmctld still knows
        (MinJobAge keeps finished ones an hour): one dict of `scontrol show job` fields per array task."""
        out = self.run("scontrol", "-o", "show", "job")
        jobs = []
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("WorkDir") == str(workdir):
                jobs.append(fields)
        return jobs

    def wait(self, workdir: Path, timeout: float, until=None) -> list[dict]:
        """Until `until(jobs)` holds for `workdir`'s jobs (default: none can still run); then their records."""
        until = until or (lambda jobs: all(j["JobState"] not in ACTIVE for j in jobs))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(workdir)
            if jobs and until(jobs):
                return jobs
            time.sleep(0.5)
        raise TimeoutError(f"jobs after {timeout}s: "
                           f"{[(j['JobId'], j['JobName'], j['JobState'], j['Reason']) for j in self.jobs(workdir)]}"
                           f"\n{self.log_tail()}")
