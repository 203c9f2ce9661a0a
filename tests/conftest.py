import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The determinism check (docs/development.md, "Determinism and tolerances") reruns the float-heavy tests on
# other CPU kernel paths; this one switches oneDNN off in the test process (subprocesses keep their default).
if os.environ.get("TPDS_TEST_NO_MKLDNN") == "1":
    torch.backends.mkldnn.enabled = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _restoring_environ():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# In-process runs write RANK, WORLD_SIZE, MASTER_PORT... into os.environ (as a launcher would); a later
# test that starts srun or torchrun must not inherit them. Module scope covers module-scoped fixtures
# that initialise a process group; function scope covers single tests.
_isolated_environ_module = pytest.fixture(scope="module", autouse=True)(_restoring_environ)
_isolated_environ = pytest.fixture(autouse=True)(_restoring_environ)


@pytest.fixture(autouse=True)
def _unconfigured_logging():
    """Each test starts with the project logger as a library sees it (no entry point has configured it) and
    leaves it so: an entry point's main() called in-process installs a handler and a level."""
    import logging

    import tpds_common.log as tlog

    root = logging.getLogger(tlog.ROOT)
    saved = (list(root.handlers), root.level, root.propagate, tlog._progress_requested, dict(tlog._current_setup))
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]
    tlog._progress_requested, tlog._current_setup = saved[3], saved[4]


@pytest.fixture
def tpds_messages():
    """The project logger's INFO-and-above lines during the test, as they read on a terminal
    (`[adapt] ... complete, skipped`), in a list the test may clear."""
    from tpds_common.log import capture

    lines: list[str] = []
    with capture(lines.append):
        yield lines


def tiny_t5(vocab_size: int = 64, **overrides):
    from transformers import T5ForConditionalGeneration

    from tensorpoly_ds.models import t5_config

    config = t5_config("tiny", vocab_size=vocab_size, **overrides)
    return T5ForConditionalGeneration(config).eval()
