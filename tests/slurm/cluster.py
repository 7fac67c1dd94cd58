"""A real one-node Slurm cluster (Debian's slurmctld/slurmd/munge) under a temporary directory.

    with LocalSlurm.start(tmp_path) as slurm:     # installs the packages first if they are missing
        job = slurm.sbatch(["--ntasks=2", "script.sh"])
        info = slurm.wait(job, timeout=120)       # the final `scontrol show job` record, as a dict

Everything (config, munge key and socket, state, spool, logs) lives under the directory. Only the
daemons this object started are stopped, by their pid files (checking /proc/PID/comm, and treating
a zombie as gone: PID 1 here reaps lazily). The daemons setsid away from the caller, so ``stop``
must run in a finally block (the context manager and an atexit hook both call it). Facts measured
on this kind of machine: shared/design/slurm_local.md.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "/usr/sbin/mungekey",
            "/usr/bin/sbatch", "/usr/bin/scontrol", "/usr/bin/squeue", "/usr/bin/scancel"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """The packages are missing and cannot be installed here (a reason to skip, not a failure)."""


def ensure_installed() -> None:
    """apt-get install the Slurm and munge packages if a binary is missing (root only)."""
    if all(os.path.exists(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for cmd, limit in ((["apt-get", *lock, "update", "-qq"], 180),
                       (["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], 420)):
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=limit)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"cannot install {' '.join(PACKAGES)}: `{' '.join(cmd)}` took over {limit} s") from None
        if r.returncode:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise SlurmUnavailable(f"cannot install {' '.join(PACKAGES)}: `{' '.join(cmd)}` failed: {' | '.join(tail)}")
    missing = [b for b in BINARIES if not os.path.exists(b)]
    if missing:
        raise SlurmUnavailable(f"installed the packages but {missing} are still missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """True for a running process; False for a gone or zombie one."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def clean_env(conf: Path | None = None) -> dict:
    """os.environ without inherited SLURM_* variables (and with SLURM_CONF when given)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    if conf is not None:
        env["SLURM_CONF"] = str(conf)
    return env


class LocalSlurm:
    DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "etc" / "slurm.conf"
        self.env = clean_env(self.conf)
        self.pidfiles = {name: self.root / "run" / f"{name}.pid" for name in self.DAEMONS}
        self._started: dict[str, int] = {}
        self._stopped = False
        self._restore_sigterm = False

    # ------------------------------------------------------------------ start
    @classmethod
    def start(cls, root: Path, timeout: float = 30) -> "LocalSlurm":
        ensure_installed()
        self = cls(root)
        atexit.register(self.stop)
        # A SIGTERM (CI cancelling, `timeout`) would end Python without finally blocks or atexit hooks
        # and leave the daemons running: turn it into SystemExit while the cluster is up.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
            self._restore_sigterm = True
        try:
            self._write_config()
            self._start_daemons(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_config(self) -> None:
        r = self.root
        for d in ("etc", "run", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o755)  # munged wants its socket directory (and the path to it) o+x
        (r / "etc").chmod(0o700)
        munge_dir = r / "munge"
        munge_dir.mkdir(exist_ok=True)
        munge_dir.chmod(0o755)
        self.munge_socket = munge_dir / "munge.socket"
        self.munge_key = r / "etc" / "munge.key"
        subprocess.run(["/usr/sbin/mungekey", "--create", f"--keyfile={self.munge_key}", "--force"],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
        self.munge_key.chmod(0o400)
        node = subprocess.run(["/usr/sbin/slurmd", "-C"], capture_output=True, text=True, check=True,
                              env=self.env, stdin=subprocess.DEVNULL).stdout.splitlines()[0].strip()
        self.node_name = node.split()[0].split("=", 1)[1]
        host = socket.gethostname().split(".")[0]
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        lines = f"""
ClusterName=test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={self.pidfiles['slurmctld']}
SlurmdPidFile={self.pidfiles['slurmd']}
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
{node} NodeAddr=127.0.0.1
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        self.conf.write_text(lines.lstrip())

    def _start_daemons(self, timeout: float) -> None:
        r = self.root
        self._spawn("munged", ["/usr/sbin/munged", f"--socket={self.munge_socket}", f"--key-file={self.munge_key}",
                               f"--log-file={r}/log/munged.log", f"--pid-file={self.pidfiles['munged']}",
                               f"--seed-file={r}/run/munged.seed"], timeout)
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-f", str(self.conf)], timeout)
        self._spawn("slurmd", ["/usr/sbin/slurmd", "-f", str(self.conf)], timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r_ = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env,
                                stdin=subprocess.DEVNULL)
            if r_.returncode == 0 and r_.stdout.strip() == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the node did not become idle in {timeout} s:\n{self.logs()}")

    def _spawn(self, name: str, cmd: list[str], timeout: float) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env, stdin=subprocess.DEVNULL, timeout=timeout)
        if r.returncode:
            raise RuntimeError(f"{name} failed to start ({r.returncode}): {r.stderr.strip()}\n{self.logs()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # daemons write their pid file after forking
            try:
                pid = int(self.pidfiles[name].read_text().split()[0])
                if _alive(pid):
                    self._started[name] = pid
                    return
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{name} wrote no pid file in {timeout} s:\n{self.logs()}")

    # ------------------------------------------------------------------ jobs
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, stdin=subprocess.DEVNULL,
                           timeout=60)
        if check and r.returncode:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | Path | None = None) -> int:
        """Submits; ``env`` adds variables to the (SLURM_*-free) environment the job inherits."""
        r = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                           env={**self.env, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL, timeout=60)
        if r.returncode:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict:
        """``scontrol show job -o`` as a dict (JobState, RunTime, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.strip()
        return dict(tok.split("=", 1) for tok in out.splitlines()[0].split() if "=" in tok)

    def jobs(self, job_id: int | str) -> list[dict]:
        """All records of a job (an array job has one per task)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.strip()
        return [dict(tok.split("=", 1) for tok in line.split() if "=" in tok) for line in out.splitlines()]

    def wait(self, job_id: int | str, timeout: float = 300, poll: float = 0.5) -> dict:
        """Polls until every record of the job is in a final state (COMPLETING/PENDING/REQUEUED are not)."""
        deadline = time.monotonic() + timeout
        while True:
            infos = self.jobs(job_id)
            if infos and all(i["JobState"] in FINAL_STATES for i in infos):
                return infos[0] if len(infos) == 1 else {"records": infos}
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s: "
                                   f"{[i['JobState'] for i in infos]}\n{self.logs()}")
            time.sleep(poll)

    def wait_state(self, job_id: int | str, states: set[str], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} never reached {states}; it is {info['JobState']}")
            time.sleep(0.2)

    def logs(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Cancels our jobs, waits for them, then stops slurmd, slurmctld and munged by their pids."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        if self._restore_sigterm and signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if "slurmctld" in self._started and _alive(self._started["slurmctld"]):
            try:
                ids = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
                if ids:
                    self.run("scancel", *ids, check=False)
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%A", check=False).stdout.strip():
                        time.sleep(0.2)
            except Exception:  # noqa: BLE001 - stopping must go on
                pass
        for name in self.DAEMONS:
            pid = self._started.get(name)
            if pid is None or not _alive(pid):
                continue
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if not comm.startswith(name[:15]):
                continue  # the pid was reused by someone else's process: not ours to stop
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def running_daemons(self) -> list[str]:
        """Names of the daemons this object started that are still alive (not zombies)."""
        return [name for name, pid in self._started.items() if _alive(pid)]

    def __enter__(self) -> "LocalSlurm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
