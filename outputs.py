"""How every output is written: atomically (a temporary name, then a rename, so a reader never
sees half a file), text and JSON on top of that, read back with a one-line error, and by one
process at a time (a lock on the folder)."""
import contextlib
import fcntl
import json
import logging
import os

from cli import UserError

log = logging.getLogger("outputs")


def atomic_write(path, write):
    """Call write(tmp) to write the file under path + ".tmp", then rename it to path: a
    reader never sees half a file, and a failed write leaves the old one in place."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(text, path):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(obj, path):
    write_text(json.dumps(obj, indent=2), path)


def read_json(path, what):
    """A JSON file's contents, or a UserError naming the file and what it should be."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is missing or unreadable ({type(e).__name__}); expected {what}") from None


@contextlib.contextmanager
def held_lock(path, wait=False):
    """Hold an flock on the file at path, for a process's writing in its folder: the system
    drops it when the process ends, however it ends. Held by another process: wait, or
    (wait=False) a UserError. Some network file systems have no flock (docs/runs.md)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise UserError(f"{os.path.dirname(path) or '.'} is in use by another process (it holds "
                            f"{path}); wait for that run to end, or choose another --out_dir") from None
        except OSError as e:  # e.g. a Lustre mount without flock
            log.warning("%s cannot be locked (%s): nothing stops a second process from writing there",
                        path, e.strerror)
        yield
