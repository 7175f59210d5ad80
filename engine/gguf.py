"""GGUF checkpoints -> a safetensors checkpoint with its tokenizer, converted once.

A GGUF file (llama.cpp's format) holds a model's weights, often quantized, with its config,
tokenizer and chat template. transformers reads it with the `gguf` package and dequantizes
every tensor to float32 (`from_pretrained(directory, gguf_file=name)`); this module does that
once and writes an ordinary checkpoint directory, so that everything else in the engine keeps
its rule: weights load from safetensors only.

The conversion is checked before it is published: the converted checkpoint, loaded the way the
engine loads models, must give the same logits on a fixed prompt as the model transformers
built from the GGUF file. The directory appears under its final name only when complete.

Example:
    >>> convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")
    PosixPath('models/smollm2')
    >>> json.loads(Path("models/smollm2/needlework_source.json").read_text())["gguf_sha256"]
    'b179c952...'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from engine.models import SUPPORTED_FAMILIES, ModelError

SOURCE_FILE = "needlework_source.json"
# GGUF `general.architecture` -> transformers model_type, for the families the engine supports.
GGUF_FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
CHECK_PROMPT = "The capital of France is Paris. The capital of Italy is"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_architecture(path: str | Path) -> str:
    """The `general.architecture` of a GGUF file; a file that is not GGUF is a ModelError."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
    except (ValueError, KeyError, OSError) as err:
        raise ModelError(f"{path}: not a readable GGUF file with general.architecture ({err})") from err
    return str(field.contents())


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, source: dict | None = None,
                 check_logits: bool = True) -> Path:
    """Dequantizes a GGUF file of a supported family into a safetensors checkpoint directory.

    Args:
        gguf_path: the GGUF file.
        out_dir: the checkpoint directory to create (replaced if it exists).
        source: where the file came from (package, version, ...), recorded in
            `needlework_source.json` next to the GGUF's sha256.
        check_logits: compare the converted checkpoint's logits with the GGUF model's on
            `CHECK_PROMPT` before publishing (max |difference| recorded).

    Raises:
        ModelError: the file is not GGUF, its family is not supported, or the converted
            checkpoint does not reproduce the GGUF model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path}: no such GGUF file")
    arch = gguf_architecture(gguf_path)
    family = GGUF_FAMILIES.get(arch)
    if family is None:
        raise ModelError(f"{gguf_path}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_FAMILIES)}")
    where = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(**where)
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    if model.config.model_type != family:
        raise ModelError(f"{gguf_path}: GGUF says {arch!r} but transformers built {model.config.model_type!r}")
    # The dequantized weights are plain float32 now; a checkpoint that still named the GGUF
    # quantizer would send every later load back to the GGUF file.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = ""

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"gguf_file": gguf_path.name, "gguf_sha256": file_sha256(gguf_path), "gguf_architecture": arch,
                  "model_type": family, **(source or {})}
        if check_logits:
            record["check_prompt"] = CHECK_PROMPT
            record["check_max_abs_logit_diff"] = _logit_difference(model, tokenizer, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _logit_difference(reference, tokenizer, checkpoint: Path) -> float:
    """Max |logit difference| between the GGUF-built model and the saved checkpoint; must be 0."""
    from engine.models import load_model

    ids = torch.tensor([tokenizer(CHECK_PROMPT)["input_ids"]])
    converted = load_model(str(checkpoint), dtype=torch.float32)
    with torch.no_grad():
        want, got = reference(ids).logits, converted(ids).logits
    diff = float((want - got).abs().max())
    if diff != 0.0:
        raise ModelError(f"{checkpoint}: the converted checkpoint does not reproduce the GGUF model "
                         f"(max |logit difference| {diff:.3g} on {CHECK_PROMPT!r})")
    return diff
