"""preemption.py's signal handling, with real signals sent to this process."""
import os
import signal

import pytest

from machinery import preemption


@pytest.fixture
def handlers():
    preemption.install()
    yield
    preemption.reset()


def test_sigterm_and_sigusr1_only_set_the_flag_and_the_first_signal_is_named(handlers):
    assert preemption.requested() is None
    os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs before os.kill returns to Python code
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.requested() == "SIGUSR1"


def test_the_first_ctrl_c_asks_to_stop_and_the_second_stops_at_once(handlers):
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.requested() == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_reset_restores_the_default_handlers(handlers):
    preemption.reset()
    assert preemption.requested() is None
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGINT) == signal.default_int_handler
