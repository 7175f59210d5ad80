"""The vllm backend: the `ray.data.llm` processor config and pipeline build on CPU (no vLLM
needed); generating needs vLLM on a GPU and is marked `gpu`."""

from __future__ import annotations

import json
import threading

import pytest

from engine.synth import SynthConfig, make_request
from engine.synth.prompts import build_chat
from engine.synth.vllm_batch import VLLMBackend, build_vllm_processor, postprocess_row, preprocess_row, processor_config


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny import save_tiny

    return str(save_tiny("llama", tmp_path_factory.mktemp("synth_vllm") / "llama", max_position_embeddings=2048))


def vllm_config(model, **kw):
    return SynthConfig(backend="vllm", model=model, tensor_parallel_size=2, concurrency=3, batch_size=16,
                       max_tokens=64, temperature=0.5, top_p=0.9, runtime_env={"pip": ["vllm"]},
                       engine_kwargs={"max_model_len": 4096}, **kw)


def test_processor_config_maps_the_yaml_fields():
    from ray.data.llm import vLLMEngineProcessorConfig

    pc = processor_config(vllm_config("org/model"))
    assert isinstance(pc, vLLMEngineProcessorConfig)
    assert pc.model_source == "org/model"
    assert (pc.batch_size, pc.concurrency) == (16, 3)
    assert pc.engine_kwargs["tensor_parallel_size"] == 2 and pc.engine_kwargs["max_model_len"] == 4096
    assert pc.runtime_env == {"pip": ["vllm"]}


def test_rows_become_vllm_requests_and_back():
    chat = build_chat(make_request("simplify_insight", template="t", insight="Cats nap a lot."))
    row = preprocess_row({"index": 4, "chat": json.dumps(chat), "seed": 7}, vllm_config("m"))
    assert row == {
        "index": 4,
        "messages": chat,
        "sampling_params": {"max_tokens": 64, "temperature": 0.5, "top_p": 0.9, "seed": 7},
    }
    assert postprocess_row({"index": 4, "generated_text": "Cats sleep.", "messages": chat}) == {
        "index": 4, "text": "Cats sleep."
    }


def test_processor_builds_the_ray_data_pipeline(ray_cluster, tiny_llama):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("p", build_vllm_processor(vllm_config(tiny_llama))),
                              daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "building the processor took over 120 s"
    processor = result["p"]
    assert processor.list_stage_names() == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage", "DetokenizeStage"]
    engine = processor.get_stage_by_name("vLLMEngineStage")
    kwargs = engine.fn_constructor_kwargs
    assert kwargs["model"] == tiny_llama and kwargs["batch_size"] == 16
    assert kwargs["engine_kwargs"]["tensor_parallel_size"] == 2
    assert kwargs["engine_kwargs"]["distributed_executor_backend"] == "ray"  # tp > 1 spans Ray workers
    assert engine.map_batches_kwargs["compute"].max_size == 3
    assert engine.map_batches_kwargs["runtime_env"] == {"pip": ["vllm"]}
    # applying the processor is lazy: it plans the stages without running vLLM
    ds = processor(ray_cluster.data.from_items([{"index": 0, "chat": "[]", "seed": 0}]))
    assert type(ds).__name__ == "Dataset"


@pytest.mark.gpu
def test_vllm_generates_on_gpu(ray_cluster, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tok.save_pretrained(tiny_llama)
    cfg = SynthConfig(backend="vllm", model=tiny_llama, temperature=0, max_tokens=8, batch_size=4,
                      engine_kwargs={"max_model_len": 2048, "gpu_memory_utilization": 0.3})
    chats = [[{"role": "user", "content": f"item {i}"}] for i in range(5)]
    texts = VLLMBackend(cfg).complete(chats, list(range(5)))
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
