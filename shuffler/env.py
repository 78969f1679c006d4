"""The one place that reads environment variables (style rule: config comes from one place)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator


def s3_endpoint_url() -> str | None:
    """Endpoint for s3:// URLs: AWS_ENDPOINT_URL_S3 (honoured by boto3 and s3fs), then FSSPEC_S3_ENDPOINT_URL."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("FSSPEC_S3_ENDPOINT_URL") or None


def torchrun_rank_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def progress_disabled() -> bool:
    """SHUFFLER_NO_PROGRESS=1 silences progress bars (tests, logs)."""
    return os.environ.get("SHUFFLER_NO_PROGRESS", "") not in ("", "0")


def torchrun_local_rank() -> int:
    """LOCAL_RANK as torchrun sets it (the GPU index on this node); 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def shuffle_fault() -> str:
    """SHUFFLER_TEST_FAULT: a fault the shuffle injects on purpose, for the crash-and-resume tests.

    Comma-separated `what=N`: kill-after-map=N / kill-after-map2=N / kill-after-reduce=N (SIGKILL the coordinator
    once N tasks of that pass have committed; map2: the level-2 scatter of --levels 2), kill-in-reduce=K (SIGKILL from inside the first reduce task as it opens its
    output shard K, so shards 0..K-1 of that bucket are written but not committed by a marker),
    pause-after-lock=SECONDS. Empty in normal use.
    """
    return os.environ.get("SHUFFLER_TEST_FAULT", "")


def s3_max_attempts() -> int:
    """SHUFFLER_S3_MAX_ATTEMPTS: botocore attempts per S3 request (throttling, 5xx, resets); default 10."""
    value = os.environ.get("SHUFFLER_S3_MAX_ATTEMPTS", "10")
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"SHUFFLER_S3_MAX_ATTEMPTS={value!r} must be an integer >= 1") from None
    if n < 1:
        raise ValueError(f"SHUFFLER_S3_MAX_ATTEMPTS={n} must be >= 1")
    return n


def _int_var(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def array_task() -> tuple[int | None, int | None, str | None]:
    """(task index, task count, which scheduler) of an array job, from the scheduler's variables.

    SLURM: SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN (arrays may start at any index, e.g. --array=1-64),
    count SLURM_ARRAY_TASK_COUNT. Kubernetes Indexed Job: JOB_COMPLETION_INDEX (0-based; the count is the Job's
    spec.completions, which is not in the environment, so None). AWS Batch: AWS_BATCH_JOB_ARRAY_INDEX and
    AWS_BATCH_JOB_ARRAY_SIZE. (None, None, None) outside an array job.
    """
    sid = _int_var("SLURM_ARRAY_TASK_ID")
    if sid is not None:
        return sid - (_int_var("SLURM_ARRAY_TASK_MIN") or 0), _int_var("SLURM_ARRAY_TASK_COUNT"), "SLURM"
    k8s = _int_var("JOB_COMPLETION_INDEX")
    if k8s is not None:
        return k8s, None, "Kubernetes (JOB_COMPLETION_INDEX)"
    aws = _int_var("AWS_BATCH_JOB_ARRAY_INDEX")
    if aws is not None:
        return aws, _int_var("AWS_BATCH_JOB_ARRAY_SIZE"), "AWS Batch"
    return None, None, None


def ray_address() -> str | None:
    """RAY_ADDRESS: the Ray cluster a driver joins when none is given (Ray's own convention)."""
    return os.environ.get("RAY_ADDRESS") or None


_child_env_lock = threading.Lock()


def glibc_tunables() -> str:
    """GLIBC_TUNABLES as this process sees it (glibc reads it once, when a process starts); empty if unset."""
    return os.environ.get("GLIBC_TUNABLES", "")


@contextlib.contextmanager
def glibc_tunables_for_children(extra: str) -> Iterator[None]:
    """Processes started inside the block get GLIBC_TUNABLES with the tunables of `extra` (`name=value:...`,
    glibc's syntax: https://www.gnu.org/software/libc/manual/html_node/Tunables.html) added to this process's
    own value; a tunable the user set keeps the user's value. multiprocessing's spawn execs the child with this
    process's C `environ` (which os.environ updates), so the variable is set for the block and restored after
    it; a lock keeps two blocks from interleaving. glibc ignores names it does not know, and other C libraries
    the variable."""
    with _child_env_lock:
        own = glibc_tunables()
        named = {t.split("=", 1)[0] for t in own.split(":") if t}
        add = [t for t in extra.split(":") if t and t.split("=", 1)[0] not in named]
        os.environ["GLIBC_TUNABLES"] = ":".join([*filter(None, own.split(":")), *add])
        try:
            yield
        finally:
            if own:
                os.environ["GLIBC_TUNABLES"] = own
            else:
                os.environ.pop("GLIBC_TUNABLES", None)
