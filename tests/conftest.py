"""Shared fixtures: the real stand-in data in ../shared and a local Ray per test module."""

import pathlib
import socket

import pytest

import dogbreeds  # noqa: F401 - sets TF_USE_LEGACY_KERAS before TensorFlow loads

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE_DIR = SHARED / "data" / "stanford_dogs_sample"
TINY_DIR = SHARED / "data" / "tiny_dogs_64"
NOT_DOGS_DIR = SHARED / "data" / "not_dogs"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
ARTIFACTS = ROOT / "test-artifacts"  # screenshots and reports kept after a run


def free_port() -> int:
    """A port nothing listens on now (other Ray clusters and servers run on this machine too)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One image cache for the whole session, as a user's ~/.cache would be."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray for each test module (whatever a module leaves reserved dies with it).
    Four logical CPUs on two cores: a run of two workers plus its driver must fit, and
    TensorFlow's thread counts are set per worker."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
