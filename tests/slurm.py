"""A real one-node SLURM (Debian's slurmctld, slurmd and munge) for the tests.

Everything lives in one folder of the test's: munge's key, socket and log, slurm.conf, the
spool and state directories, the daemons' logs and the job completion log. Clients find it
through ``SLURM_CONF`` (set in this process's environment while the cluster is up, so that
dask-jobqueue's ``sbatch``/``scancel`` and the jobs themselves use it). Nothing under /etc
is touched and nothing outlives :meth:`OneNodeSlurm.stop`.

Needs root (slurmd starts jobs as their user) and the Debian packages; ``.ci/run`` installs
them. Without them the SLURM tests are skipped, unless ``MSMTU_REQUIRE_SLURM=1`` (set by
``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")


def missing_requirements() -> str | None:
    """Why a SLURM cannot be started here, or None."""
    if os.geteuid() != 0:
        return "needs root to start slurmd"
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return "Debian packages slurmctld, slurmd, slurm-client and munge are not installed (no " + \
            ", ".join(missing) + ")"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, seconds: float, what: str, log: Path | None = None) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not happen within {seconds:.0f} s\n{tail}")


class OneNodeSlurm:
    """Start with :meth:`start`, stop with :meth:`stop`; ``env`` is what clients need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.jobcomp = root / "jobcomp.log"
        self.munge_socket = root / "munge" / "munge.socket"
        self.host = socket.gethostname().split(".")[0]
        self.env = {"SLURM_CONF": str(self.conf)}
        self._munged_pid: int | None = None
        self._saved_env: dict[str, str | None] = {}

    def _run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60,
                              env=os.environ | self.env, **kwargs)

    def start(self) -> OneNodeSlurm:
        munge = self.root / "munge"
        munge.mkdir(parents=True)
        munge.chmod(0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # as root munged needs --force; its socket, pid and seed stay in our folder
        self._run("munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                  f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
                  f"--seed-file={munge / 'munged.seed'}")
        _wait(lambda: (munge / "munged.pid").exists(), 10, "munged start", munge / "munged.log")
        self._munged_pid = int((munge / "munged.pid").read_text())
        for folder in ("state", "spool", "log"):
            (self.root / folder).mkdir()
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024
        # no cgroup.conf: with one, slurmd 22.05 fails in containers ("cannot create cgroup context")
        self.conf.write_text(f"""\
ClusterName=msmtutest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool'}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd.pid'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}
SlurmdLogFile={self.root / 'log' / 'slurmd.log'}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
MpiDefault=none
MinJobAge=300
DefMemPerCPU=1024
NodeName={self.host} CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN
PartitionName=batch Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        for name, value in self.env.items():
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = value
        self._run("slurmctld")
        _wait(lambda: self._ok("scontrol", "ping"), 20, "slurmctld start", self.root / "log" / "slurmctld.log")
        self._run("slurmd")
        _wait(lambda: "idle" in self._output("sinfo", "-h", "-o", "%T"), 30, "slurmd registration",
              self.root / "log" / "slurmd.log")
        return self

    def _ok(self, *args: str) -> bool:
        return subprocess.run(args, capture_output=True, env=os.environ | self.env).returncode == 0

    def _output(self, *args: str) -> str:
        done = subprocess.run(args, capture_output=True, text=True, env=os.environ | self.env)
        return done.stdout if done.returncode == 0 else ""

    def jobs(self) -> list[dict[str, str]]:
        """Finished jobs from the job completion log: one mapping of its fields per job."""
        if not self.jobcomp.exists():
            return []
        return [dict(field.split("=", 1) for field in line.split() if "=" in field)
                for line in self.jobcomp.read_text().splitlines()]

    def queue(self) -> list[str]:
        """Job ids pending or running."""
        return self._output("squeue", "-h", "-o", "%i").split()

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--quiet", *self.queue()], capture_output=True,
                       env=os.environ | self.env) if self.queue() else None
        subprocess.run(["scontrol", "shutdown"], capture_output=True, env=os.environ | self.env)
        for pid_file in ("slurmctld.pid", "slurmd.pid"):
            _wait_for_exit(self.root / pid_file)
        if self._munged_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._munged_pid, 15)
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _wait_for_exit(pid_file: Path, seconds: float = 15) -> None:
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, 9)
