from services.dispatcher.engine import ExecutorDirectory


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def directory(clock: Clock) -> ExecutorDirectory:
    d = ExecutorDirectory(stale_after=3.0, clock=clock)
    d.report(executor_id="a", address="a:1", capacity=4, in_flight=3, draining=False)
    d.report(executor_id="b", address="b:1", capacity=4, in_flight=0, draining=False)
    return d


def test_the_executor_with_most_free_slots_is_chosen_and_its_slot_reserved():
    d = directory(Clock())
    chosen = [d.choose().executor_id for _ in range(5)]
    assert chosen.count("b") == 4 and chosen.count("a") == 1
    assert d.choose() is None  # every slot reserved until the next reports


def test_draining_stale_or_excluded_executors_are_skipped():
    clock = Clock()
    d = directory(clock)
    d.report(executor_id="b", address="b:1", capacity=4, in_flight=0, draining=True)
    assert d.choose().executor_id == "a"
    assert d.choose(exclude={"a"}) is None
    clock.now = 10.0  # no report for longer than stale_after
    assert d.choose() is None


def test_a_refusal_marks_an_executor_full_and_a_release_gives_a_slot_back():
    d = directory(Clock())
    d.full("b")
    assert d.choose().executor_id == "a"
    d.release("a")
    assert d.choose().executor_id == "a"
