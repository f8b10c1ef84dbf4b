"""runtime.mix: a checked mix is read-only, passes later checks for the same tasks and is
checked afresh against other tasks."""
import pickle

import pytest

from tvswitch.errors import TvswitchError
from tvswitch.runtime import mix as mixes


def test_a_checked_mix_is_in_the_tasks_order_and_read_only():
    checked = mixes.check_mix({"b": 1, "a": 0.5}, ["a", "b", "c"])
    assert list(checked.items()) == [("a", 0.5), ("b", 1.0)]
    with pytest.raises(TypeError, match="read-only"):
        checked["a"] = 2.0
    with pytest.raises(TypeError, match="read-only"):
        checked.update(c=1.0)
    assert dict(checked) == {"a": 0.5, "b": 1.0}


def test_a_checked_mix_passes_again_without_a_second_check(monkeypatch):
    checked = mixes.check_mix({"a": 1.0}, ["a", "b"])
    calls = []
    monkeypatch.setattr(mixes, "check_weight", lambda value, what: calls.append(what) or float(value))
    assert mixes.check_mix(checked, ["a", "b"]) is checked
    assert calls == []
    mixes.check_mix(dict(checked), ["a", "b"])  # a plain copy is checked again
    assert len(calls) == 1


def test_a_mix_checked_for_other_tasks_is_checked_again():
    checked = mixes.check_mix({"a": 1.0}, ["a", "b"])
    with pytest.raises(TvswitchError, match="no task 'a'"):
        mixes.check_mix(checked, ["x", "y"], "other.tvs")


def test_a_checked_mix_pickles_as_a_plain_dict():
    checked = mixes.check_mix({"a": 1.0}, ["a"])
    again = pickle.loads(pickle.dumps(checked))
    assert type(again) is dict and again == {"a": 1.0}
