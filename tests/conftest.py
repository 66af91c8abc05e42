import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (a seed derived from each test function),
# so a red CI run is reproducible and a green one stays green. `pytest --hypothesis-profile
# explore` draws fresh random examples, more of them, to hunt for new counterexamples locally.
settings.register_profile("derandomized", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", derandomize=False, max_examples=1000, deadline=None)
settings.load_profile("derandomized")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tiny tokenizer and indexed dataset of short pseudo-sentences (tests/_fixtures.py), made
    once per test session and shared by the training, recipe and fault-injection tests."""
    from _fixtures import make_corpus

    d = tmp_path_factory.mktemp("corpus")
    make_corpus(d)
    return d


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    """torch.distributed and megatron's parallel state for one process (TP=PP=1), for a test
    module that builds models in-process; torn down after the module. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_process_group")``."""
    from megatron_nbdiff.parallel import destroy_parallel, initialize_parallel

    store = tmp_path_factory.mktemp("pg") / "store"
    initialize_parallel(1, 1, init_method=f"file://{store}", rank=0, world_size=1)
    yield
    destroy_parallel()
