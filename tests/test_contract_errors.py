"""The host explains contract violations in one line, and judges divergence on predictions too."""

import json

import pytest
import torch

from noprop_bench import Method, UsageError
from noprop_bench.cli import EXIT_TRIAL_FAILED, run
from noprop_bench.conformance import ContractViolation, build_method
from noprop_bench.testing.tiny import tiny_task


def _records(out):
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def _grid(tmp_path, methods, *extra, executor="local"):
    out = tmp_path / executor.replace("[", "-").replace("]", "").replace("=", "")
    code = run(["--plugin", "fake_plugins", "--plugin", "broken_plugins", "--dataset", "tiny", "--methods", methods,
                "--budget", "4steps", "--checkpoints", "1", "--threads", "1", "--executor", executor,
                "--out", str(out), *extra])
    return code, {(r["method"], r["seed"]): r for r in _records(out)}


def test_violations_become_one_line_naming_plugin_class_and_fix(tmp_path, one_thread, capsys):
    code, records = _grid(tmp_path, "no_super_init,float_loss,wrong_shape,misspelt_target,linear")
    assert code == EXIT_TRIAL_FAILED
    errors = {method: r["error"] for (method, _), r in records.items()}
    assert records[("linear", 0)]["status"] == "ok"
    for method, fix in (("no_super_init", "call super().__init__(task, **params) first in __init__"),
                        ("float_loss", "train_step must return tensors (e.g. loss.detach(), not loss.item())"),
                        ("wrong_shape", "predict must return floating logits of shape [B, num_classes] = [8, 4], "
                                        "not shape [8, 2]"),
                        ("misspelt_target", "compile_targets() names 'haed', which the method has no callable "
                                            "attribute of")):
        assert records[(method, 0)]["status"] == "failed"
        assert errors[method].startswith("contract violation: plugin 'broken_plugins', class broken_plugins.")
        assert fix in errors[method]
        assert "\n" not in errors[method]
    # a wrong predict is found by the warm-up's inference probe, before any of the budget is spent
    assert records[("wrong_shape", 0)]["steps"] == 0
    printed = capsys.readouterr().err
    assert "_modules" not in printed and "Traceback" not in printed
    assert f"failed: {errors['no_super_init']}" in printed


@pytest.mark.parametrize("checkpoints", ["1", "0"], ids=["at-a-checkpoint", "at-the-final-evaluation"])
def test_non_finite_predictions_are_divergence(checkpoints, tmp_path, one_thread):
    code, records = _grid(tmp_path, "nan_predictions,nan_diagnostic", "--checkpoints", checkpoints)
    assert code == EXIT_TRIAL_FAILED
    assert records[("nan_predictions", 0)]["status"] == "diverged"
    assert records[("nan_predictions", 0)]["error"] == "non-finite predictions"
    assert len(records[("nan_predictions", 0)]["curve"]) == 0  # stopped at the first evaluation
    # a NaN in an optional diagnostic setting is reported there, not held against the trial
    assert records[("nan_diagnostic", 0)]["status"] == "ok"
    assert records[("nan_diagnostic", 0)]["diagnostics"]["broken"] is not None


def test_a_step_without_loss_warns_once(tmp_path, one_thread, capsys):
    code, records = _grid(tmp_path, "no_loss")
    assert code == 0 and records[("no_loss", 0)]["status"] == "ok"
    assert len(records[("no_loss", 0)]["warnings"]) == 1
    assert capsys.readouterr().err.count("train_step returns no 'loss'") == 1


@pytest.mark.parametrize("executor", ["local", "local[workers=2]"])
def test_a_usage_error_while_building_a_method_fails_that_trial_and_the_grid_goes_on(executor, tmp_path, one_thread):
    code, records = _grid(tmp_path, "refuses_seed,linear", "--seeds", "2", executor=executor)
    assert code == EXIT_TRIAL_FAILED
    assert {key: r["status"] for key, r in records.items()} == {
        ("refuses_seed", 0): "ok", ("refuses_seed", 1): "failed", ("linear", 0): "ok", ("linear", 1): "ok"}
    error = records[("refuses_seed", 1)]["error"]
    assert error.startswith("bad input: plugin 'broken_plugins', class broken_plugins.RefusesSeed: ")
    assert error.endswith("refuses_seed cannot train seed 1")


def test_a_batch_larger_than_the_training_split_stops_in_process_and_fails_each_trial_in_workers(
        tmp_path, one_thread, capsys):
    """Only the loaded dataset can tell (the README's exit statuses): the host loads it for an in-process run,
    the workers for theirs."""
    with pytest.raises(UsageError, match="^batch size 300 exceeds the 256 training images$"):
        _grid(tmp_path, "linear", "--batch-size", "300")
    code, records = _grid(tmp_path, "linear", "--batch-size", "300", "--seeds", "2", executor="local[workers=2]")
    assert code == EXIT_TRIAL_FAILED
    assert [(r["status"], r["error"]) for _, r in sorted(records.items())] == [
        ("failed", "bad input: batch size 300 exceeds the 256 training images")] * 2


def test_only_a_missing_super_init_is_blamed_on_super_init():
    class ChecksFirst(Method):
        name = "checks_first"

        def __init__(self, task, **params):
            if task.seed == 0:
                raise UsageError("checks_first refuses seed 0")  # before super().__init__: still bad input
            super().__init__(task, **params)

    with pytest.raises(UsageError, match="refuses seed 0"):
        build_method(ChecksFirst, tiny_task(seed=0), {})
    assert isinstance(build_method(ChecksFirst, tiny_task(seed=1), {}), ChecksFirst)


def test_a_misspelt_compile_target_fails_its_own_trial_and_speed_row_only(tmp_path, one_thread, capsys):
    """Found when the method is built, so eager runs see it too; under --compile neither the grid nor speed stops."""
    code, records = _grid(tmp_path, "misspelt_target,linear", "--compile", "default")
    assert code == EXIT_TRIAL_FAILED
    assert records[("linear", 0)]["status"] == "ok" and records[("misspelt_target", 0)]["status"] == "failed"
    out = tmp_path / "speed"
    code = run(["speed", "--plugin", "fake_plugins", "--plugin", "broken_plugins", "--dataset", "tiny", "--methods",
                "misspelt_target,no_super_init,linear", "--batch-size", "8", "--steps", "1", "--out", str(out)])
    assert code == 1
    rows = {row["method"]: row for row in json.loads((out / "speed.json").read_text())["rows"]}
    assert rows["linear"]["ms_per_step"] > 0 and rows["linear"]["ratio"] == 1.0  # the first measured row
    assert "compile_targets() names 'haed'" in rows["misspelt_target"]["error"]
    assert "call super().__init__(task, **params) first" in rows["no_super_init"]["error"]
    assert rows["no_super_init"]["error_at"]  # where it was raised, as a trial's record says


def test_graph_breaks_under_compile_are_recorded_with_the_trial_and_counted_by_speed(tmp_path, one_thread):
    """What torch.compile could not trace in a compiled target (here a number read back) is kept with the
    trial, by reason, for a plugin author to look into; speed's notes count the breaks."""
    code, records = _grid(tmp_path, "item_in_step", "--compile", "default", "--checkpoints", "0")
    assert code == 0
    breaks = records[("item_in_step", 0)]["speed_settings"]["graph_breaks"]
    assert any("item()" in reason for reason in breaks) and all(count >= 1 for count in breaks.values())
    out = tmp_path / "speed"
    assert run(["speed", "--plugin", "fake_plugins", "--plugin", "broken_plugins", "--dataset", "tiny", "--methods",
                "item_in_step", "--compile", "default", "--batch-size", "8", "--steps", "1", "--out", str(out)]) == 0
    row = json.loads((out / "speed.json").read_text())["rows"][0]
    assert any("item()" in reason for reason in row["graph_breaks"])
    assert f"{sum(row['graph_breaks'].values())} graph break(s)" in (out / "speed.md").read_text()


@pytest.mark.parametrize("batch", [1, 2, 9])
@pytest.mark.parametrize("compiled", [False, True])
def test_the_warm_up_inference_probe_checks_each_pass_against_its_own_images(batch, compiled):
    """Whatever the training batch (one image included), the probe's passes compare logits with the images
    they were given; a wrong predict is named."""
    from noprop_bench.run.runner import _warm_up_inference
    from noprop_bench.testing.tiny import ConformanceMethod

    task = tiny_task()
    method = build_method(ConformanceMethod, task, ConformanceMethod.resolve_params({}))
    x = task.normalize(task.train_images[:batch])
    sizes = []
    predict = method.predict
    method.predict = lambda images, **setting: sizes.append(len(images)) or predict(images, **setting)
    with torch.inference_mode():
        _warm_up_inference(method, x, compiled)()
    expected = {1: [1], 2: [2], 9: [4, 9]}[batch] if compiled else [min(batch, 8)]
    assert sizes == expected  # compiled: two sizes where the batch has them, for a batch-dynamic graph
    method.predict = lambda images, **setting: predict(images, **setting)[:, :2]
    with pytest.raises(ContractViolation, match=r"not shape \[\d+, 2\]"), torch.inference_mode():
        _warm_up_inference(method, x, compiled)()
