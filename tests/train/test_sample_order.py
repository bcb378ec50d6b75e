"""`train.sample_order`: a permutation whose every window holds the tasks and answers in the data's proportions."""

from collections import Counter

import pytest
import torch

from train.sample_order import StratifiedLengthGroupedSampler, stratified_order

NO_CHANGE = "there is no difference"


def mixed_keys() -> list[tuple[str, str]]:
    """1 500 samples: captions half "no change", localization twice as many as binary, answers of varied text."""
    keys = [("caption", NO_CHANGE)] * 300 + [("caption", f"a new road is built {i % 7}") for i in range(300)]
    keys += [("binary", "yes")] * 150 + [("binary", "no")] * 150
    keys += [("localization", f"roads [] buildings [{i % 9}]") for i in range(600)]
    return keys


def worst_window_deviation(keys, order, window: int, field=lambda key: key[0]) -> float:
    """The largest gap, over every window of `window` consecutive samples and every value of `field`, between the
    window's count of that value and its share of the whole."""
    values = [field(keys[i]) for i in order]
    shares = {value: count / len(values) for value, count in Counter(values).items()}
    worst = 0.0
    for start in range(len(values) - window + 1):
        counts = Counter(values[start : start + window])
        worst = max(worst, max(abs(counts[value] - share * window) for value, share in shares.items()))
    return worst


def test_every_window_holds_the_tasks_and_answers_in_proportion():
    keys = mixed_keys()
    torch.manual_seed(0)
    order = stratified_order(keys)
    assert sorted(order) == list(range(len(keys)))  # a permutation: an epoch sees every sample once
    for window in (8, 16, 45):
        assert worst_window_deviation(keys, order, window) <= 2.0
    # within the captions, "no change" and change captions alternate in proportion over any stretch of the run
    captions = [i for i in order if keys[i][0] == "caption"]
    assert worst_window_deviation(keys, captions, 20, field=lambda key: key[1] == NO_CHANGE) <= 2.0

    # what it replaces: a random permutation's windows stray several samples from the proportions
    generator = torch.Generator().manual_seed(0)
    shuffled = torch.randperm(len(keys), generator=generator).tolist()
    assert worst_window_deviation(keys, shuffled, 45) > 4.0
    shuffled_captions = [i for i in shuffled if keys[i][0] == "caption"]
    assert worst_window_deviation(keys, shuffled_captions, 20, field=lambda key: key[1] == NO_CHANGE) > 4.0


def test_the_order_follows_the_seed_and_equal_keys_come_in_random_order():
    keys = mixed_keys()
    first = stratified_order(keys, torch.Generator().manual_seed(3))
    assert first == stratified_order(keys, torch.Generator().manual_seed(3))
    second = stratified_order(keys, torch.Generator().manual_seed(4))
    assert first != second
    # the 300 identical "no change" captions: which of them comes first is drawn, not the data's order
    no_change = {i for i, key in enumerate(keys) if key == ("caption", NO_CHANGE)}
    assert [i for i in first if i in no_change] != sorted(no_change)
    assert stratified_order([]) == []


def test_the_sampler_sorts_each_window_by_length_and_draws_a_new_order_every_epoch():
    keys = mixed_keys()
    lengths = [len(answer) + 3 * (task == "localization") for task, answer in keys]
    sampler = StratifiedLengthGroupedSampler(keys, lengths=lengths, window_size=8)
    torch.manual_seed(0)
    epoch_one, epoch_two = list(sampler), list(sampler)
    assert len(sampler) == len(keys) and sorted(epoch_one) == list(range(len(keys)))
    assert epoch_one != epoch_two
    windows = [epoch_one[start : start + 8] for start in range(0, len(keys), 8)]
    assert all([lengths[i] for i in window] == sorted((lengths[i] for i in window), reverse=True) for window in windows)
    # sorting inside a step does not change which samples the step holds
    torch.manual_seed(0)
    unsorted = list(StratifiedLengthGroupedSampler(keys))
    assert [sorted(unsorted[s : s + 8]) for s in range(0, len(keys), 8)] == [sorted(w) for w in windows]


def test_bad_sampler_arguments_are_named():
    with pytest.raises(ValueError, match="3 keys but 2 lengths"):
        StratifiedLengthGroupedSampler([1, 2, 3], lengths=[1, 2])
    with pytest.raises(ValueError, match="window_size"):
        StratifiedLengthGroupedSampler([1, 2, 3], window_size=2)
    with pytest.raises(ValueError, match="window_size"):
        StratifiedLengthGroupedSampler([1, 2, 3], lengths=[1, 2, 3], window_size=0)


def _samplers(seed):
    from train.trainer import WindowedLengthGroupedSampler

    keys = mixed_keys()[:200]
    lengths = [len(key[1]) for key in keys]
    return [StratifiedLengthGroupedSampler(keys, lengths=lengths, window_size=16, seed=seed),
            WindowedLengthGroupedSampler(4, lengths=lengths, window=4, seed=seed)]


def test_an_epochs_order_depends_on_seed_and_epoch_only():
    """What a run resumed inside epoch k needs: set_epoch(k) gives epoch k's order again, whatever torch's global
    generator went through before (the Trainer calls set_epoch each epoch, through accelerate's data loader)."""
    for first, second, other_seed in zip(_samplers(0), _samplers(0), _samplers(1)):
        first.set_epoch(1)
        expected = list(first)
        torch.manual_seed(1234)
        torch.rand(17)  # another run's history of random draws
        second.set_epoch(1)
        assert list(second) == expected, type(first).__name__
        second.set_epoch(0)
        assert list(second) != expected  # a fresh order every epoch
        other_seed.set_epoch(1)
        assert list(other_seed) != expected


def test_iterating_again_without_set_epoch_moves_to_the_next_epoch():
    for sampler, reference in zip(_samplers(0), _samplers(0)):
        first, second = list(sampler), list(sampler)  # a plain DataLoader: no set_epoch between passes
        assert first != second and sorted(first) == sorted(second) == list(range(200))
        reference.set_epoch(1)
        assert list(reference) == second
