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


def tiny_t5(vocab_size: int = 64, **overrides):
    from transformers import T5ForConditionalGeneration

    from tensorpoly_ds.models import t5_config

    config = t5_config("tiny", vocab_size=vocab_size, **overrides)
    return T5ForConditionalGeneration(config).eval()
