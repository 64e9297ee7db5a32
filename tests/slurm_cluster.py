"""A real SLURM cluster on localhost for tests: munged, slurmctld and one slurmd per node.

Debian's `slurm-wlm` and `munge` (installed by `make setup-slurm`, as root). Everything lives in
one folder the caller owns: a generated munge key and slurm.conf, state, spool, logs, sockets —
no system path is written. Two nodes are two slurmd on this host (`slurmd -N nodeN`, each on its
own port, NodeAddr 127.0.0.1): SLURM treats them as separate nodes (node ids, per-node task
launch), the network between them is loopback.

`stop()` cancels the jobs, then ends exactly the daemons this object started (their pids), then
any job process still holding a file in the folder (slurmstepd re-parents itself to init).

    with SlurmCluster.start(tmp_path, nodes=2) as cluster:
        job = cluster.sbatch(["-n2", "job.sh"])
        cluster.wait(job)
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def unavailable_reason() -> Optional[str]:
    """Why no test cluster can run here (None when it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root (slurmd runs jobs as root here; `make setup-slurm` installs SLURM)"
    missing = [d for d in COMMANDS if shutil.which(d) is None]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing): run `make setup-slurm` as root"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(root: Path, nodes: int, cpus: int, ctld_port: int, node_ports: Sequence[int]) -> str:
    names = [f"node{i + 1}" for i in range(nodes)]
    lines = [
        "ClusterName=nova3dtest",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={node_ports[0]}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
        f"AuthInfo=socket={root / 'munge.socket'},cred_expire=5",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}/%n",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        "ProctrackType=proctrack/linuxproc",  # no cgroups needed
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",  # jobs share a node by CPU (array tasks run side by side)
        "SelectTypeParameters=CR_CPU",
        "SlurmdParameters=config_overrides",  # trust CPUs= below, not the (2-core) hardware
        "ReturnToService=2",
        "MpiDefault=none",
        "KillWait=5",
        "MinJobAge=600",  # finished jobs stay visible to squeue/scontrol while the test reads them
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1,bf_interval=1",  # a requeued job starts within ~1 s of eligible
        "MailProg=/bin/true",
    ]
    for name, port in zip(names, node_ports):
        lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} Port={port} "
                     f"State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    nodes: int
    procs: list[subprocess.Popen] = field(default_factory=list)

    # --- start / stop -------------------------------------------------------------------------

    @classmethod
    def start(cls, root: str | os.PathLike, nodes: int = 1, cpus: int = 4, timeout: float = 30) -> "SlurmCluster":
        root = Path(root).resolve()
        for sub in ("state", "log", *[f"spool/node{i + 1}" for i in range(nodes)]):
            (root / sub).mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # munged refuses sockets in group/world-writable folders
        ports = [free_port() for _ in range(nodes + 1)]
        conf = root / "slurm.conf"
        conf.write_text(_conf(root, nodes, cpus, ports[0], ports[1:]))
        cluster = cls(root, conf, nodes)
        try:
            subprocess.run(["mungekey", "-c", "-f", "-k", str(root / "munge.key")], check=True, capture_output=True)
            cluster._spawn("munged", ["munged", "-F", "--force", f"--socket={root / 'munge.socket'}",
                                      f"--key-file={root / 'munge.key'}", f"--pid-file={root / 'munged.pid'}",
                                      f"--seed-file={root / 'munged.seed'}", f"--log-file={root / 'log/munged.log'}"])
            cluster._wait_for(lambda: (root / "munge.socket").exists(), timeout, "munged socket")
            cluster._spawn("slurmctld", ["slurmctld", "-D", "-f", str(conf)])
            for i in range(nodes):
                cluster._spawn(f"slurmd-node{i + 1}", ["slurmd", "-D", "-f", str(conf), "-N", f"node{i + 1}"])
            cluster._wait_for(cluster._all_idle, timeout, f"{nodes} idle node(s) in sinfo")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        # Own session: a Ctrl-C in the test's terminal does not reach the daemons before stop() does.
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))
        log.close()

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}; logs:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"no {what} after {timeout:.0f} s; logs:\n{self.logs()}")

    def _all_idle(self) -> bool:
        done = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        states = [line.split()[-1] for line in done.stdout.splitlines() if line.strip()]
        return done.returncode == 0 and len(states) == self.nodes and all(s == "idle" for s in states)

    def stop(self) -> None:
        """Cancel jobs, end our daemons (TERM, then KILL), then stray job processes using our folder."""
        if any(p.poll() is None for p in self.procs):
            self.run(["scancel", "--full", "--quiet", "--partition=debug"], check=False, timeout=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False, timeout=10).stdout.strip():
                time.sleep(0.3)
        for proc in reversed(self.procs):  # slurmd first, munged last
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs = []
        for pid in self.stray_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stray_processes(self) -> list[int]:
        """Pids (not this process) started for this cluster: an open file, cwd or command line in our
        folder (slurmstepd: its spool socket), or our SLURM_CONF in the environment (job processes)."""
        mine, found = os.getpid(), []
        prefix = str(self.root)
        conf = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == mine:
                continue
            try:
                if conf in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
                    continue
                links = [os.readlink(entry / "cwd")] + [os.readlink(fd) for fd in (entry / "fd").iterdir()]
                links.append((entry / "cmdline").read_bytes().decode(errors="replace"))
            except OSError:
                continue
            if any(prefix in link for link in links):
                found.append(int(entry.name))
        return found

    def __enter__(self) -> "SlurmCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- clients ------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """This process's environment for SLURM clients: our slurm.conf, no SLURM_/SBATCH_ leftovers."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, argv: Sequence[str], env: Optional[Mapping[str, str]] = None, check: bool = True,
            timeout: float = 60, cwd: Optional[os.PathLike] = None) -> subprocess.CompletedProcess:
        done = subprocess.run(list(argv), env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def sbatch(self, args: Sequence[str], env: Optional[Mapping[str, str]] = None,
               cwd: Optional[os.PathLike] = None) -> str:
        """Submit; returns the job id ("123", or "123" for a whole array)."""
        return self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip().split(";")[0]

    def states(self, job: str) -> dict[str, str]:
        """{job id (array tasks as 12_0, 12_1): state} for a job or all tasks of an array."""
        done = self.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%i %T"], check=False)
        return dict(line.split()[:2] for line in done.stdout.splitlines() if len(line.split()) >= 2)

    def wait(self, job: str, timeout: float = 300, until: frozenset = frozenset(FINISHED)) -> dict[str, str]:
        """Wait until every task of `job` is in a state of `until`; returns the states."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.states(job)
            if states and all(s in until for s in states.values()):
                return states
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {states} after {timeout:.0f} s; logs:\n{self.logs()}")

    def job_info(self, job: str) -> str:
        return self.run(["scontrol", "show", "job", job], check=False).stdout

    def logs(self, tail: int = 15) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)
