"""What every command shares: the one-line error a user is shown, the exit statuses, the
stop at a safe point after SIGTERM, the --help format, and the check that a path can be an
output folder."""
import argparse
import logging
import os
import signal
import sys

EXIT_USER_ERROR = 2  # a UserError, or argparse's usage error: the command must change
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM; the same command with --resume goes on

log = logging.getLogger("cli")


class UserError(Exception):
    """A problem the user can fix: the message names the file or option and what was
    expected. Commands print it as one line and exit with EXIT_USER_ERROR."""


class Interrupted(Exception):
    """Raised at a safe point after a SIGTERM: what --resume needs is on disk."""


class Sigterm:
    """SIGTERM (Slurm's time limit or preemption, `kill`) asks a training command to stop at
    its next safe point, where everything --resume needs is on disk, instead of dying in
    the middle of a write. Signals are the process's, so the request is too."""
    received = False

    @classmethod
    def _receive(cls, signum, frame):
        if not cls.received:
            log.warning("SIGTERM: stopping at the next point from which --resume goes on")
        cls.received = True

    @classmethod
    def stop_here(cls, where):
        """A safe point: raise Interrupted if a SIGTERM has come."""
        if cls.received:
            raise Interrupted(f"stopped by SIGTERM {where}: the same command with --resume goes on")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in --help, except where it says nothing: a flag (off unless
    given), a required option, or one whose help says what happens when it is not given."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def command(main, log, stops_on_sigterm=False):
    """Run main() as a command: INFO logging; a UserError, or an output the system refuses,
    printed as one line with exit status 2. With stops_on_sigterm, a SIGTERM ends the run
    at its next safe point (or at its end) with exit status 75. Returns what main returns."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, Sigterm._receive) if stops_on_sigterm else None
    try:
        result = main()
        Sigterm.stop_here("at the end of the run, with everything written")
        return result
    except Interrupted as e:
        log.error("%s", e)
        status = EXIT_INTERRUPTED
    except UserError as e:
        log.error("%s", e)
        status = EXIT_USER_ERROR
    except OSError as e:  # an output folder that is a file, or not writable
        log.error("%s: %s", e.filename or "output", e.strerror or e)
        status = EXIT_USER_ERROR
    finally:
        if stops_on_sigterm:
            signal.signal(signal.SIGTERM, previous)
            Sigterm.received = False
    sys.exit(status)


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
