"""Shared fixtures: tiny checkpoints written once per test session, and an environment
that can never reach the network or the user's caches."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Tests import their helpers as `support.*` (tests/support/); with importlib mode the
# tests folder is not put on sys.path by pytest itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Set before anything imports huggingface_hub or starts Ray (workers inherit os.environ).
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="gptoss-ray-tests-"))
os.environ.setdefault("GPTOSS_RAY_CACHE", str(_SESSION_DIR / "cache"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(_SESSION_DIR / "hf-home"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _checkpoint(tmp_path_factory: pytest.TempPathFactory, preset: str) -> Path:
    from gptoss_ray.checkpoint import write_checkpoint
    from gptoss_ray.config import PRESETS

    return write_checkpoint(PRESETS[preset], tmp_path_factory.mktemp(preset), seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The `tiny` preset: 2 layers (sliding + full), 8 experts, MXFP4, 3 shards."""
    return _checkpoint(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_odd_ckpt(tmp_path_factory) -> Path:
    """hidden != expert width, heads x head_dim != hidden, 6 experts, 3 layers."""
    return _checkpoint(tmp_path_factory, "tiny-odd")


@pytest.fixture(scope="session")
def tiny_moe_ckpt(tmp_path_factory) -> Path:
    """15 experts (not divisible by 2, 3 or 4) for expert-parallel tests."""
    return _checkpoint(tmp_path_factory, "tiny-moe")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one test module (the expert-parallel tests)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_moe_ckpt):
    """One rank's run of parallel_helpers.PROMPTS, which every expert-parallel run must equal."""
    from support.parallel_helpers import generate, make_engine

    engine = make_engine(tiny_moe_ckpt, 1)
    try:
        outputs, _ = generate(engine)
        return dict(outputs=outputs, expert_load=engine.stats().expert_load)
    finally:
        engine.shutdown()


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
