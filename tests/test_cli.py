"""Bad input gets exit status 2 and one clear line; failures are recorded and summarised."""

import importlib.abc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from noprop_bench import console
from noprop_bench.cli import main, run


def _exit(args, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--plugin", "fake_plugins", "--dataset", "tiny", *args])
    captured = capsys.readouterr()
    return stopped.value.code, captured.err


@pytest.mark.parametrize("args, expected", [
    (["--methods", "nope"], "unknown method 'nope'; available: "),
    (["--methods", "linear", "--dataset", "nope"], "unknown dataset 'nope'; available: "),
    (["--methods", "linear", "--backbone", "resnet_nope"], "unknown backbone 'resnet_nope'; any timm model name"),
    (["--methods", "linear", "--budget", "ten"], "budget 'ten' not understood; accepted: SECONDS"),
    (["--methods", "linear", "--budget", "5epochs (paper)"],
     "--budget '5epochs (paper)': a name in parentheses is what --budget paper records (as in '100epochs (paper)'); "
     "give the amount alone, e.g. 5epochs"),
    (["--methods", "linear", "--budget", "1.5 (quick)"], "give the amount alone, e.g. 1.5s"),
    (["--methods", "linear[lr=fast]"], "parameter lr='fast': expected float"),
    (["--methods", "linear[momentum=1]"], "method 'linear' has no parameter momentum; accepted: embedding, lr"),
    # refused before training, not as a failed or diverged trial once it has begun
    (["--methods", "linear[lr=nan]"], "parameter lr=nan: must be a finite number"),
    (["--methods", "noprop_fm[lr=1e309]"], "parameter lr=1e309: must be a finite number"),
    (["--methods", "noprop_ct[steps=99999999999999999999]"], "parameter steps=99999999999999999999: beyond 64 bits"),
    (["--methods", "noprop_ct[steps=1e20]"], "parameter steps='1e20': expected a whole number (int), as its default "
                                            "1000\n"),  # no "write 100000000000000000000": that is refused too
    (["--methods", "linear", "--budget", "99999999999999999999999999samples"],
     "budget '99999999999999999999999999samples': too large a number"),
    (["--methods", "linear[lr]"], "method parameter 'lr' in 'linear[lr]' not understood; write key=value"),
    (["--methods", "linear[lr=0.1,lr=0.2]"], "method parameter 'lr' is given twice in 'linear[lr=0.1,lr=0.2]'"),
    (["--methods", "linear", "--executor", "local[workers=1,workers=2]"], "executor parameter 'workers' is given twice"),
    (["--methods", "linear", "--seeds", "0"], "--seeds 0: must be a whole number of at least 1"),
    (["--methods", "linear", "--val-split", "1.5"], "--val-split 1.5: must be a fraction in [0, 1)"),
    (["--methods", "linear", "--plugin", "no_such_module_xyz"], "--plugin no_such_module_xyz: cannot import it"),
    (["--methods", "linear", "--executor", "slurmish"], "unknown executor 'slurmish'; available: local, ray, submitit"),
    (["--methods", "linear", "--executor", "local[workers=two]"],
     "parameter workers='two': expected a whole number (int)"),
    (["--methods", "linear", "--executor", "local[workers=1.5]"],
     "parameter workers='1.5': expected a whole number (int), as its default 0"),
    (["--methods", "noprop_ct[steps=1e3]"], "parameter steps='1e3': expected a whole number (int), as its default "
                                           "1000; write 1000"),
    (["--methods", "linear", "--executor", "local[cores=2]"], "executor 'local' has no option cores; accepted: workers"),
    (["--methods", "linear", "--executor", "local[workers=-1]"], "workers must be 0 (in-process) or more"),
    (["--methods", "linear", "--executor", "submitit[cluster=pbs]"], "cluster must be auto (SLURM), slurm or local"),
    (["--methods", "linear", "--executor", "submitit[gres=nvme:1;GPU:1]"], "ask for GPUs with gpus_per_node=N"),
    (["--methods", "linear", "--executor", "ray[cpus=0]"], "cpus must be at least 1"),
    (["--methods", "linear", "--threads", "0"], "--threads 0: must be a whole number of at least 1"),
    (["--methods", "linear", "--device", "cpu", "--cudnn-benchmark"],
     "--cudnn-benchmark: cuDNN runs on CUDA devices only, not on cpu"),
])
def test_bad_input_exits_2_with_one_line(args, expected, capsys):
    code, err = _exit(args, capsys)
    assert code == 2
    assert expected in err
    if "available" in expected and "executor" not in expected:
        assert "linear" in err or "tiny" in err  # the valid names are listed
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags", [["--augment", "crop_flip", "--no-augment"],
                                   ["--train-accuracy", "--no-train-accuracy"],
                                   ["--no-channels-last", "--channels-last"],
                                   ["--cudnn-benchmark", "--no-cudnn-benchmark"]])
def test_a_flag_and_its_negation_together_are_refused(flags, capsys):
    """argparse would let the last one win silently."""
    code, err = _exit(["--methods", "linear", *flags], capsys)
    assert code == 2
    assert f"argument {flags[-1]}: not allowed with argument {flags[0]}" in err


def test_speed_refuses_a_flag_and_its_negation_together(capsys):
    from noprop_bench.run.speed import speed_main

    with pytest.raises(SystemExit) as stopped:
        speed_main(["--channels-last", "on", "--no-channels-last"])
    assert stopped.value.code == 2
    assert "argument --no-channels-last: not allowed with argument --channels-last" in capsys.readouterr().err


def test_console_script_reports_unknown_method_without_traceback():
    done = subprocess.run([sys.executable, "-m", "noprop_bench", "--methods", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown method 'nope'; available:" in done.stderr and "backprop" in done.stderr
    assert "Traceback" not in done.stderr


def test_list_names_every_method_and_dataset_with_its_plugin(capsys):
    from noprop_bench.cli import run

    assert run(["--plugin", "fake_plugins", "--list"]) == 0
    out = capsys.readouterr().out
    assert "backprop" in out and "from plugin backprop" in out
    assert "mnist5k" in out and "from plugin mnist5k" in out
    assert "linear" in out and "from plugin fake_plugins" in out
    datasets = out.split("Datasets:\n")[1].split("Executors:")[0].splitlines()
    assert len({re.match(r"  \S+ +", line).end() for line in datasets}) == 1  # descriptions in one column
    assert "imagefolder:ARG Image folder ARG/{train,test}/<class>/* (any format Pillow reads) from plugin" in out


def test_failed_trial_is_recorded_and_others_run(fake_run, capsys):
    code, out = fake_run("--methods", "explode,linear", "--budget", "5steps", "--seeds", "1")
    assert code == 1
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    by_method = {r["method"]: r for r in records}
    assert by_method["explode"]["status"] == "failed"
    assert "boom in train_step" in by_method["explode"]["error"]
    assert by_method["linear"]["status"] == "ok"
    err = capsys.readouterr().err
    assert "1 trial(s) did not finish ok" in err and "Explode (one-hot) seed 0: failed" in err
    table = (out / "table1.md").read_text()
    assert "Linear (one-hot)" in table and "Not in the table:" in table and "failed" in table


def test_nan_loss_is_recorded_as_diverged(fake_run):
    code, out = fake_run("--methods", "nan_loss", "--budget", "60steps", "--seeds", "1")
    assert code == 1
    record = json.loads((out / "trials.jsonl").read_text())
    assert record["status"] == "diverged"
    assert "non-finite loss" in record["error"]
    assert record["steps"] <= 25  # detected at the first check, not after the whole budget
    from noprop_bench.report.records import check_records
    assert check_records([record]) == ([record], [])  # reported as diverged, not skipped as damaged


def test_checking_an_output_directory_makes_nothing(tmp_path):
    """A run refused later (bad data, say), or a report of a misspelt directory, leaves no empty folder."""
    from noprop_bench.errors import UsageError
    from noprop_bench.run.store import check_output_directory

    check_output_directory(tmp_path / "not-yet" / "run", "--out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # would fail only when the first record is written
    with pytest.raises(UsageError, match=f"dangling is a symbolic link to {tmp_path / 'nowhere'}, which does not"):
        check_output_directory(tmp_path / "dangling", "--out")


def test_unusable_outputs_and_bad_targets_are_refused_before_anything_runs(tmp_path, capsys):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    (tmp_path / "bare.json").write_text('{"format": 1, "rows": {}}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "future.json").write_text('{"format": 99, "rows": {}}')
    cases = [
        (["--out", str(in_the_way / "sub")], "is a file, not a directory"),
        (["--targets", "90,abc"], "--targets '90,abc': expected accuracies"),
        (["--save-baseline", str(in_the_way / "b.json")], f"--save-baseline {in_the_way}: {in_the_way} is a file"),
        (["--save-baseline", str(tmp_path)], "is a directory; give a file name"),
        (["--baseline", str(tmp_path / "bare.json"), "--save-baseline", str(tmp_path / "bare.json")],
         "is also --baseline"),
        (["--baseline", str(tmp_path / "list.json")], "not a noprop-bench baseline (a JSON object with rows"),
        (["--baseline", str(tmp_path / "future.json")], "baseline format 99, but this version"),
    ]
    if Path("/proc/self").is_dir():  # a pseudo file system: permissions say yes (to root), writing fails
        cases.append((["--out", "/proc/noprop-bench-out"], "cannot be written to"))
    for number, (args, expected) in enumerate(cases):
        out = tmp_path / f"run{number}"
        arguments = ["--methods", "linear", "--budget", "3steps", *args]
        code, err = _exit(arguments if "--out" in args else [*arguments, "--out", str(out)], capsys)
        assert code == 2 and expected in err and "Traceback" not in err, (args, err)
        assert not (out / "trials.jsonl").exists()  # nothing trained
    fixture = Path(__file__).parent / "fixtures" / "report" / "mnist"
    for command in (["speed", "--methods", "linear", "--steps", "1"], ["report", str(fixture)]):
        with pytest.raises(SystemExit) as stopped:
            main([command[0], "--plugin", "fake_plugins", "--dataset", "tiny", *command[1:],
                  "--out", str(in_the_way)] if command[0] == "speed" else [*command, "--out", str(in_the_way)])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and "is a file, not a directory" in err and "Traceback" not in err


def test_help_shows_no_misleading_defaults():
    from noprop_bench.run.speed import build_parser as speed_parser
    from noprop_bench.cli import build_parser

    for parser in (build_parser(), speed_parser()):
        text = parser.format_help()
        # --no-* flags and options decided later (by the device, a preset, the dataset) printed these
        assert "(default: True)" not in text and "(default: None)" not in text
        assert "(default: 128)" in text  # real defaults are still shown


def test_ctrl_c_while_the_tables_are_written_keeps_every_trial_and_says_how_to_write_them(fake_run, monkeypatch,
                                                                                          capsys):
    from noprop_bench import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "write_run_outputs", interrupted)
    code, out = fake_run("--methods", "linear", "--budget", "64samples", "--checkpoints", "0")
    assert code == 130
    assert json.loads((out / "trials.jsonl").read_text().splitlines()[0])["status"] == "ok"
    assert f"noprop-bench report {out} writes them" in capsys.readouterr().err


@pytest.mark.parametrize("broken_load, expected", [
    ("missing", "dataset 'tiny' could not load its train split: FileNotFoundError: no train.bin here"),
    ("float_images", "dataset 'tiny' could not load its train split: ValueError: images must be a uint8 tensor"),
    ("label_out_of_range", "dataset 'tiny' breaks the dataset contract in its train split: labels must lie in "
                           "0..3 (one per name in classes); found 0..4"),
    ("not_a_split", "dataset 'tiny': load('train') returned tuple, not a noprop_bench.Split"),
    ("numpy_labels", "dataset 'tiny' could not load its train split: ValueError: labels must be a torch tensor, not "
                     "numpy.ndarray: pass torch.as_tensor(labels, dtype=torch.long)"),
    ("channels_last", "dataset 'tiny' breaks the dataset contract in its train split: the images look channels-last "
                      "[N, H, W, C] ([16, 16, 1] per image): store images.permute(0, 3, 1, 2).contiguous()"),
    ("three_means", "dataset 'tiny' breaks the dataset contract in its train split: mean and std need one value per "
                    "channel (1), as a tuple such as (0.5,); got 3 and 3"),
    ("scalar_means", "dataset 'tiny' breaks the dataset contract in its train split: mean and std need one value per "
                     "channel (1), as a tuple such as (0.5,); got 0.5 and tensor(0.2000)"),
])
def test_a_dataset_that_fails_to_load_is_one_line_naming_the_dataset(broken_load, expected, monkeypatch, capsys,
                                                                     tmp_path):
    import torch
    import fake_plugins
    from noprop_bench.datasets import Split

    def load(self, split):
        images = torch.zeros(8, 1, 16, 16, dtype=torch.uint8)
        if broken_load == "missing":
            raise FileNotFoundError(f"no {split}.bin here")
        if broken_load == "float_images":
            return Split(images.float(), torch.zeros(8, dtype=torch.long))
        if broken_load == "label_out_of_range":
            return Split(images, torch.arange(8) % 5)
        if broken_load == "numpy_labels":
            return Split(images, torch.zeros(8, dtype=torch.long).numpy())
        if broken_load == "channels_last":
            return Split(images.permute(0, 2, 3, 1), torch.zeros(8, dtype=torch.long))
        if broken_load in ("three_means", "scalar_means"):
            return Split(images, torch.zeros(8, dtype=torch.long))
        return images, torch.zeros(8, dtype=torch.long)

    monkeypatch.setattr(fake_plugins.Tiny, "load", load)
    if broken_load in ("three_means", "scalar_means"):
        monkeypatch.setattr(fake_plugins.Tiny, "mean", (0.5,) * 3 if broken_load == "three_means" else 0.5)
        monkeypatch.setattr(fake_plugins.Tiny, "std", (0.2,) * 3 if broken_load == "three_means" else torch.tensor(0.2))
    code, err = _exit(["--methods", "linear", "--budget", "64samples", "--out", str(tmp_path / "a" / "run")], capsys)
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert tmp_path.exists() and not (tmp_path / "a").exists()  # refused before any trial: nothing it made is left


def test_a_failed_trial_says_which_line_of_the_plugin_raised_and_keeps_the_innermost_frames(fake_run, capsys):
    """The error is raised deep inside torch; the line to fix is the plugin's. Before, the stored traceback
    was the outermost 8 frames (the harness's) and the closing lines pointed nowhere."""
    import fake_plugins

    code, out = fake_run("--methods", "deep_error", "--budget", "64samples", "--checkpoints", "0")
    assert code == 1
    record = json.loads((out / "trials.jsonl").read_text().splitlines()[0])
    line = next(number for number, text in enumerate(Path(fake_plugins.__file__).read_text().splitlines(), 1)
                if "# the mistake" in text)
    assert record["error_at"] == f"{fake_plugins.__file__}:{line} in _project"
    assert record["traceback"].rstrip().splitlines()[-1].startswith("RuntimeError: mat1 and mat2 shapes")
    assert f'fake_plugins.py", line {line}, in _project' in record["traceback"]
    err = capsys.readouterr().err
    assert f"(raised at {fake_plugins.__file__}:{line} in _project; its traceback is in {out / 'trials.jsonl'})" in err


def test_a_lone_plugin_modules_line_is_named_not_a_library_beside_it(tmp_path, monkeypatch):
    """A one-file plugin installed into site-packages sits beside torch: its folder is not its code."""
    import textwrap
    from noprop_bench.run.jobs import note_exception

    (tmp_path / "lone_library.py").write_text("def fail():\n    raise ValueError('inside a library')\n")
    (tmp_path / "lone_plugin.py").write_text(textwrap.dedent("""
        import lone_library

        class Method:
            def train_step(self):
                lone_library.fail()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import lone_plugin

    record = {}
    with pytest.raises(ValueError) as raised:
        lone_plugin.Method().train_step()
    note_exception(record, raised.value, lone_plugin.Method)
    assert record["error_at"] == f"{tmp_path / 'lone_plugin.py'}:6 in train_step"


def test_the_closing_line_names_only_the_files_written(fake_run, capsys):
    code, out = fake_run("--methods", "explode", "--budget", "64samples", "--checkpoints", "0")
    assert code == 1
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("results in"))
    assert "table1.md" in line and "figure3" not in line  # no trial finished ok: nothing to draw
    assert not (out / "figure3.png").exists()


def test_save_baseline_equal_to_a_missing_baseline_says_what_is_wrong(tmp_path, capsys):
    target = str(tmp_path / "b.json")
    code, err = _exit(["--methods", "linear", "--baseline", target, "--save-baseline", target], capsys)
    assert code == 2 and "is also --baseline" in err and "no such file" not in err


def test_a_method_named_twice_with_the_same_parameters_runs_once_and_says_so(fake_run, capsys):
    code, out = fake_run("--methods", "linear,linear[lr=0.05]", "--budget", "64samples", "--checkpoints", "0")
    assert code == 0 and len((out / "trials.jsonl").read_text().splitlines()) == 1
    assert "names Linear (one-hot) (linear) more than once with the same parameters; it runs once" in \
        capsys.readouterr().err


@pytest.mark.parametrize("given", ["run", "run/trials.jsonl"])
def test_report_of_a_file_asks_for_its_run_directory(given, fake_run, tmp_path, capsys):
    fake_run("--methods", "linear", "--budget", "64samples", "--checkpoints", "0", out=tmp_path / "run")
    (tmp_path / "run.txt").write_text("")
    capsys.readouterr()
    path = tmp_path / ("run.txt" if given == "run" else given)
    code = run(["report", str(path)])
    assert code == 2
    assert f"{path}: a file; give the run directory that holds trials.jsonl" in capsys.readouterr().err


def test_report_re_renders_a_run_with_its_train_columns(fake_run, tmp_path):
    code, out = fake_run("--methods", "linear", "--budget", "64samples", "--checkpoints", "0", "--train-accuracy")
    assert code == 0 and "tiny train" in (out / "table1.md").read_text().lower()
    before = (out / "table1.md").read_text()
    assert run(["report", str(out)]) == 0  # writes into the run's own folder
    assert (out / "table1.md").read_text() == before


def test_an_error_of_a_subcommand_names_the_subcommand_as_argparse_does(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["speed", "--steps", "0"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == "noprop-bench speed: error: --steps 0: must be a whole number of at least 1"


@pytest.mark.parametrize("command", [["--methods", "linear", "--out", ""], ["--methods", "linear", "--backbone", " "],
                                     ["--methods", "linear", "--data-root", ""], ["speed", "--out", ""],
                                     ["report", "results", "--out", ""], ["new-plugin", "my_thing", "--dir", ""]])
def test_an_empty_path_or_name_is_refused_not_taken_for_the_default(command, capsys):
    """An unset shell variable (--out "$OUT") wrote into results/<dataset>-<timestamp> as if --out were left out."""
    with pytest.raises(SystemExit) as stopped:
        main(command if command[0] in ("speed", "report", "new-plugin") else ["--plugin", "fake_plugins", *command])
    assert stopped.value.code == 2
    assert "must not be empty (an unset shell variable?): give a value, or leave the option out" in \
        capsys.readouterr().err


def test_method_parameters_are_refused_only_where_they_cannot_work():
    from noprop_bench import UsageError
    from noprop_bench.method import coerce_value

    assert coerce_value("offset", str(-2 ** 63), 0) == -2 ** 63
    assert coerce_value("n", str(2 ** 63 - 1), 0) == 2 ** 63 - 1
    assert coerce_value("max_norm", "inf", float("inf")) == float("inf")  # inf is the default: "no limit"
    with pytest.raises(UsageError, match="must be a finite number"):
        coerce_value("lr", "inf", 1e-3)


def test_more_threads_than_cores_are_warned_of(fake_run, monkeypatch, capsys):
    from noprop_bench.run import jobs

    monkeypatch.setattr(jobs, "cpu_count", lambda: 2)
    assert jobs.threads_beyond_cores(2, "") == "" and jobs.threads_beyond_cores(None, "") == ""
    code, _ = fake_run("--methods", "linear", "--budget", "2steps", "--checkpoints", "0", "--threads", "3")
    assert code == 0
    assert ("warning: --threads 3 is more than the 2 CPU core(s) this process may use: the threads wait for cores"
            in capsys.readouterr().err)


def test_a_second_run_into_an_out_folder_in_use_is_refused(fake_run, tmp_path):
    """Two runs writing one --out at once would both train every trial and store each twice."""
    from noprop_bench import UsageError

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(out)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match="another noprop-bench run is writing there"):
            fake_run("--methods", "linear", "--budget", "1steps")
        assert not (out / "trials.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert fake_run("--methods", "linear", "--budget", "1steps")[0] == 0
    assert fake_run("--methods", "linear", "--budget", "1steps", "--seeds", "2")[0] == 0  # released after each run


def test_ctrl_c_while_the_command_line_still_imports_ends_quietly(monkeypatch, capsys):
    """The entry point catches an interrupt that lands while torch and the harness load, before
    :func:`noprop_bench.cli.main` (which catches the later ones) exists."""
    class InterruptedImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "noprop_bench.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "noprop_bench.cli")
    monkeypatch.setattr(sys, "meta_path", [InterruptedImport(), *sys.meta_path])
    with pytest.raises(SystemExit) as stopped:
        console.main()
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "noprop-bench: interrupted\n"


def test_a_reader_that_stops_early_ends_the_command_without_a_traceback():
    """``noprop-bench --list | head -1`` on a long list: the pipe closes before everything is written."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # output buffered, as usual
    process = subprocess.Popen([sys.executable, "-m", "noprop_bench", "--list"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environment)
    process.stdout.close()  # before the command writes anything
    error = process.stderr.read()
    assert process.wait(timeout=120) == 141, error
    assert "Traceback" not in error and "BrokenPipeError" not in error
