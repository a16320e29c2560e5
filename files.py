"""What every command shares: the files a run writes (one atomic write, a temporary name
then a rename, with text and JSON on top of it), the check that a path can be an output
folder, the one error a user is shown, and the --help format."""
import argparse
import contextlib
import fcntl
import json
import logging
import os
import sys

log = logging.getLogger("files")


class UserError(Exception):
    """A problem the user can fix: the message names the file or option and what was
    expected. The command-line scripts print it as one line and exit with status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in --help, except where there is none: a required option, or
    one whose help says what happens when it is not given."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def command(main, log):
    """Run main() as a command: INFO logging; a UserError, or an output the system refuses,
    is printed as one line with exit status 2. Returns what main returns."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main()
    except UserError as e:
        log.error("%s", e)
    except OSError as e:  # an output folder that is a file, or not writable
        log.error("%s: %s", e.filename or "output", e.strerror or e)
    sys.exit(2)


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


def out_dir_problem(path, option="--out_dir"):
    """Why path cannot be an output folder (it, or a folder above it, is a file; or it is a
    broken link), in one line; None when it can."""
    p = os.path.abspath(path)
    if os.path.islink(p) and not os.path.exists(p):
        return f"{option} {path} is a link to {os.readlink(p)}, which does not exist"
    while not os.path.exists(p):
        if os.path.dirname(p) == p:
            return None
        p = os.path.dirname(p)
    if os.path.isdir(p):
        return None
    what = f"{option} {path}" if p == os.path.abspath(path) else f"{option} {path}: {p}"
    return f"{what} is a file, not a folder: give {option} a folder's path"


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
