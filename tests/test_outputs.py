"""outputs.py: no reader ever sees half a file, a JSON file that cannot be read is named in
one line, and one process at a time writes a run's folder."""
import os
import subprocess
import sys

import pytest

from cli import UserError
from outputs import atomic_write, held_lock, read_json, write_json
from tiny import ROOT


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = str(tmp_path / "results.json")
    write_json({"accuracy": 0.9}, path)

    def fails_halfway(tmp):
        with open(tmp, "w") as f:
            f.write('{"accur')
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fails_halfway)
    assert read_json(path, "results") == {"accuracy": 0.9} and os.listdir(tmp_path) == ["results.json"]


def test_a_missing_or_cut_short_json_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"nowhere.json is missing or unreadable \(FileNotFoundError\); expected "
                                        r"the history"):
        read_json(str(tmp_path / "nowhere.json"), "the history")
    (tmp_path / "cut.json").write_text('{"train": ')
    with pytest.raises(UserError, match=r"cut.json is missing or unreadable \(JSONDecodeError\)"):
        read_json(str(tmp_path / "cut.json"), "the history")


def test_a_folder_is_locked_while_a_process_writes_there(tmp_path):
    """A second process into a held folder stops with one line; the lock goes with the
    holder's end, however it ends (here SIGKILL)."""
    lock = str(tmp_path / ".lock")
    holder = subprocess.Popen([sys.executable, "-c", "import outputs, time\n"
                               f"with outputs.held_lock({lock!r}):\n print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=f"{tmp_path} is in use by another process .it holds {lock}.; wait"):
            with held_lock(lock):
                pass
    finally:
        holder.kill()
        holder.wait()
    with held_lock(lock):  # the killed holder's lock went with it
        with pytest.raises(UserError, match="in use by another process"):
            with held_lock(lock):  # held by this process, through another open file
                pass
