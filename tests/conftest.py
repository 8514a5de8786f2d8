"""Session-wide test settings.

Tiny layers run ~10x faster on one intra-op thread on a shared 2-core machine (idle OpenMP threads
spin and crowd each other out), so torch runs single-threaded and OpenMP waits passively. Timing code
under test sets onnxruntime's threads explicitly and is unaffected.
"""

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch's OpenMP runtime starts

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _own_latency_cache(tmp_path_factory):
    """Layer timings go to this session's own cache file: the tests neither read the user's
    (``~/.cache/convfactor``, where a timing from another run would decide what a test measures) nor add the
    tests' toy layers to it."""
    before = os.environ.get("CONVFACTOR_CACHE_DIR")
    os.environ["CONVFACTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("convfactor-cache"))
    yield
    if before is None:
        os.environ.pop("CONVFACTOR_CACHE_DIR", None)
    else:
        os.environ["CONVFACTOR_CACHE_DIR"] = before


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``main(argv)`` in-process from the repository root; returns (exit code, stdout, stderr)."""
    from convfactor.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # so --arch tests.cli_models:... imports

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def ckpt(tmp_path):
    """A state_dict of ``tests.cli_models:tiny_net`` with random weights, saved as ``tmp_path/net.pt``."""
    from tests.cli_models import TinyNet, randomized

    path = tmp_path / "net.pt"
    torch.save(randomized(TinyNet()).state_dict(), path)
    return path


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every factorize call the CLI makes (the real factorize still runs)."""
    seen = []
    import convfactor.api

    real = convfactor.api.factorize

    def spy(model, policy, example_inputs=None, **kwargs):
        seen.append({"policy": policy, **kwargs})
        return real(model, policy, example_inputs, **kwargs)

    monkeypatch.setattr(convfactor.api, "factorize", spy)
    return seen
