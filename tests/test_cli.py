"""cli.py: the one-line error and its exit status, the stop at a safe point after SIGTERM
(exit 75), the --help format, and the check that a path can be an output folder."""
import importlib
import logging
import os
import signal
import subprocess
import sys

import pytest

import cli
from cli import UserError
from tiny import ROOT, TINY_DEMO, hw5_args

COMMANDS = ("Dataset", "train", "hw5_main", "predict", "synthetic.coco", "network")
log = logging.getLogger("test")


@pytest.mark.parametrize("module", COMMANDS)
def test_help_shows_real_defaults_only_and_marks_required_options(module):
    text = importlib.import_module(module).get_args_parser().format_help()
    assert "default: False" not in text and "default: None" not in text
    parser = importlib.import_module(module).get_args_parser()
    for action in parser._actions:
        if action.required and action.option_strings:
            assert "(required)" in action.help, action.dest


def test_a_user_error_is_one_line_and_status_2(caplog):
    def fails():
        raise UserError("DATA/train_data.pkl not found; expected a directory built by Dataset.py")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stopped:
        cli.command(fails, log)
    assert stopped.value.code == cli.EXIT_USER_ERROR == 2
    assert [r.getMessage() for r in caplog.records] == [
        "DATA/train_data.pkl not found; expected a directory built by Dataset.py"]


def test_sigterm_is_answered_at_the_next_safe_point_with_status_75(caplog):
    """The handler only records the request: the work in progress goes on to the next safe
    point, which stops the command with one line and status 75; the handler and the flag
    are the process's again afterwards."""
    reached = []

    def run():
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append("after the signal")  # not killed: the work goes on
        cli.Sigterm.stop_here("after step 1")
        reached.append("after the safe point")

    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stopped:
        cli.command(run, log, stops_on_sigterm=True)
    assert stopped.value.code == cli.EXIT_INTERRUPTED == 75 and reached == ["after the signal"]
    assert "stopped by SIGTERM after step 1: the same command with --resume goes on" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is before and not cli.Sigterm.received

    def finishes():
        os.kill(os.getpid(), signal.SIGTERM)
        return "done"
    with pytest.raises(SystemExit) as stopped:  # no safe point after it: the end is one
        cli.command(finishes, log, stops_on_sigterm=True)
    assert stopped.value.code == 75
    assert cli.command(lambda: "done", log, stops_on_sigterm=True) == "done"


def test_a_command_that_does_not_train_dies_of_sigterm_at_once():
    code = "import cli, os, signal, time\ncli.command(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)), None)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGTERM


def test_an_out_dir_that_is_a_file_stops_every_script_with_one_line(tmp_path):
    import Dataset
    import hw5_main
    import predict
    import synthetic.coco as synthetic_coco
    import train
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    message = "afile is a file, not a folder"
    with pytest.raises(UserError, match=message):
        hw5_main.main(hw5_args("--out_dir", str(afile), *TINY_DEMO))
    with pytest.raises(UserError, match=message):  # a folder below a file
        hw5_main.main(hw5_args("--out_dir", str(afile / "run"), *TINY_DEMO))
    with pytest.raises(UserError, match=message):
        train.main(train.get_args_parser().parse_args(["--data_dir", "DATA", "--out_dir", str(afile)]))
    with pytest.raises(UserError, match=message):
        synthetic_coco.main(synthetic_coco.get_args_parser().parse_args(["--out_dir", str(afile)]))
    with pytest.raises(Dataset.DatasetError, match=message):
        Dataset.main(Dataset.get_args_parser().parse_args(["--coco_dir", "COCO", "--out_dir", str(afile)]))
    with pytest.raises(UserError, match=message):
        predict.main(predict.get_args_parser().parse_args(["--weights", "w.pt", "--out_dir", str(afile), "x.jpg"]))
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    with pytest.raises(UserError, match="link is a link to .*nowhere, which does not exist"):
        hw5_main.main(hw5_args("--out_dir", str(tmp_path / "link"), *TINY_DEMO))
    assert cli.out_dir_problem(str(tmp_path / "new" / "run")) is None
