import pytest

from noprop_bench.run.budget import Budget, TrainingClock
from noprop_bench.errors import UsageError
from noprop_bench.specs import parse_dataset_spec, parse_method_list, parse_method_spec


@pytest.mark.parametrize("text, amount, unit", [
    ("120", 120.0, "seconds"), ("1.5s", 1.5, "seconds"), ("20000samples", 20000, "samples"),
    ("500steps", 500, "steps"), (" 30 seconds ", 30.0, "seconds"),
])
def test_budget_parses(text, amount, unit):
    budget = Budget.parse(text)
    assert (budget.amount, budget.unit) == (amount, unit)
    assert Budget.parse(str(budget)) == budget


@pytest.mark.parametrize("text", ["", "abc", "-5", "0", "10minutes", "2.5steps", "0samples"])
def test_budget_rejects_with_accepted_forms(text):
    with pytest.raises(UsageError, match="accepted|whole number"):
        Budget.parse(text)


def test_budget_progress_by_unit():
    assert Budget.parse("10").progress(5.0, 0, 0) == 0.5
    assert Budget.parse("100samples").progress(99.0, 50, 1) == 0.5
    assert Budget.parse("4steps").progress(99.0, 50, 1) == 0.25
    assert Budget.parse("4steps").deterministic and not Budget.parse("4").deterministic


def test_clock_counts_only_between_start_and_stop(monkeypatch):
    now = iter([10.0, 12.0, 20.0, 21.0]).__next__
    monkeypatch.setattr("noprop_bench.run.budget.time.perf_counter", now)
    clock = TrainingClock("cpu")
    clock.start()
    clock.stop()  # 2 s of training
    clock.start()  # 8 s passed while stopped (evaluation)
    clock.stop()  # 1 s of training
    assert clock.elapsed() == 3.0


def test_method_specs_with_parameters():
    assert parse_method_spec("noprop_ct[embedding=prototype,lr=3e-4]") == (
        "noprop_ct", {"embedding": "prototype", "lr": "3e-4"})
    assert parse_method_list("a, b[x=1,y=2],c") == [("a", {}), ("b", {"x": "1", "y": "2"}), ("c", {})]
    assert parse_dataset_spec("imagefolder:/data/x:y") == ("imagefolder", "/data/x:y")
    assert parse_dataset_spec("mnist") == ("mnist", None)
    with pytest.raises(UsageError, match="after a colon"):  # written like a method's options
        parse_dataset_spec("imagefolder[path=/data/x]")


@pytest.mark.parametrize("text", ["a[b=1", "a]", "a[b]", "a[=1]", "1abc", "a b", ""])
def test_malformed_method_specs(text):
    with pytest.raises(UsageError):
        parse_method_list(text)


@pytest.mark.parametrize("text, written", [("120", "120s"), ("0.5", "0.5s"), ("1000000", "1000000s"),
                                           ("1234.5678", "1234.5678s"), ("9007199254740993steps",
                                                                          "9007199254740993steps")])
def test_a_budget_is_written_exactly_and_reads_back_the_same(text, written):
    """Workers parse the budget's text again: ``1e+06s`` was refused there, and 1234.5678 s ran as 1234.57."""
    budget = Budget.parse(text)
    assert str(budget) == written and Budget.parse(str(budget)) == budget


def test_a_count_with_a_fraction_is_refused_however_long():
    with pytest.raises(UsageError, match="must be a whole number"):
        Budget.parse("9007199254740993.5steps")  # 2**53 + 1.5: as a float, the fraction vanished
