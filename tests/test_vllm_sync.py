"""The policy adapter, and only it, reaches vLLM. vLLM itself cannot run here (CUDA only): the engine is a
recording stand-in, while TRL's real weight-sync code (`VLLMGeneration.sync_weights`) runs unchanged."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl.distributed import DistributedBackend
from trl.generation.vllm_generation import VLLMGeneration

from prime_trl.algo.prm import add_prm_adapter, default_prm_lora_config
from prime_trl.trainer import vllm_sync


class RecordingEngine:
    """Stands in for a colocated `vllm.LLM`: records pushed weights, generate calls and their LoRA requests."""

    def __init__(self):
        self.loaded: dict[str, torch.Tensor] = {}
        self.generate_calls: list[dict] = []
        model = SimpleNamespace(load_weights=self._load)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)))
        )

    def _load(self, weights):
        for name, tensor in weights:
            self.loaded[name] = tensor.detach().clone()

    def reset_prefix_cache(self):
        pass

    def generate(self, prompts, sampling_params=None, use_tqdm=False, lora_request=None):
        self.generate_calls.append({"prompts": prompts, "lora_request": lora_request})
        return []


@pytest.fixture
def two_adapter_model(tiny_model_dir):
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    add_prm_adapter(model, "prm", None, default_prm_lora_config(model.peft_config["default"]))
    with torch.no_grad():  # give both adapters distinct non-zero deltas
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3 if ".default." in name else 3.0)
    return model


def trl_generation(model, engine):
    """TRL's VLLMGeneration in colocate mode, built around the stand-in engine (no vLLM needed)."""
    generation = object.__new__(VLLMGeneration)
    accelerator = Accelerator(cpu=True)
    generation.model, generation.accelerator, generation.llm = model, accelerator, engine
    generation.mode, generation.enable_sleep_mode = "colocate", False
    generation._dist = DistributedBackend(accelerator)
    return generation


def lora_delta(model, module_name, adapter):
    layer = model.get_submodule(module_name)
    return (layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight) * layer.scaling[adapter]


def test_merge_sync_pushes_policy_merged_weights_never_prm(two_adapter_model):
    model, engine = two_adapter_model, RecordingEngine()
    generation = trl_generation(model, engine)
    vllm_sync.guard_merge_sync(generation, model)
    model.set_adapter("prm")  # even if the PRM were left active when generation starts...
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    generation.sync_weights()

    assert engine.loaded and not any("lora" in n or "prm" in n for n in engine.loaded)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    pushed = engine.loaded["model.layers.0.self_attn.q_proj.weight"]
    base = model.get_submodule(module).base_layer.weight
    torch.testing.assert_close(pushed, base + lora_delta(model, module, "default"))  # ...only the policy is merged
    assert not torch.allclose(pushed, base + lora_delta(model, module, "prm"), atol=1e-3)
    # the trainer's model is left as it was: unmerged (up to the float rounding of TRL's merge / unmerge),
    # with the PRM still the active adapter
    for name, param in model.named_parameters():
        if "lora_" not in name:
            torch.testing.assert_close(param, base_weights[name], rtol=0, atol=1e-6)
    assert model.active_adapter == "prm"


def test_lora_sync_exports_only_the_policy_adapter(two_adapter_model, tmp_path, monkeypatch):
    requests = []
    monkeypatch.setattr(
        vllm_sync, "make_lora_request", lambda name, int_id, path: requests.append((name, int_id, path)) or requests[-1]
    )
    model, engine = two_adapter_model, RecordingEngine()
    generation = trl_generation(model, engine)
    sync = vllm_sync.LoRAAdapterSync(model, tmp_path / "export", keep=2)
    sync.install(generation)

    generation.llm.generate([{"prompt_token_ids": [1, 2]}], sampling_params=None, use_tqdm=False)
    assert engine.generate_calls[-1]["lora_request"] == ("prime-policy", 1, tmp_path / "export" / "v1")
    for _ in range(2):
        generation.sync_weights()
    assert [r[1] for r in requests] == [1, 2, 3]  # a fresh lora_int_id per sync, so vLLM reloads
    generation.llm.generate([{"prompt_token_ids": [3]}])
    assert engine.generate_calls[-1]["lora_request"][2] == tmp_path / "export" / "v3"
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["v2", "v3"]  # older exports pruned

    exported = load_file(str(tmp_path / "export" / "v3" / "adapter_model.safetensors"))
    policy = {n: p for n, p in model.named_parameters() if ".default." in n}
    assert len(exported) == len(policy) and not any("prm" in k for k in exported)
    for key, tensor in exported.items():  # PEFT names without the adapter name, as vLLM expects
        torch.testing.assert_close(tensor, policy[key.replace(".weight", ".default.weight")])
    assert not engine.loaded  # no base weights streamed in LoRA mode


def test_engine_with_lora_adds_lora_arguments(monkeypatch):
    import trl.generation.vllm_generation as module

    calls = []
    monkeypatch.setattr(module, "LLM", lambda **kwargs: calls.append(kwargs), raising=False)
    with vllm_sync.engine_with_lora(max_lora_rank=12):
        module.LLM(model="m")
    module.LLM(model="m")
    assert calls[0] == {"model": "m", "enable_lora": True, "max_lora_rank": 16, "max_loras": 1}
    assert calls[1] == {"model": "m"}  # restored afterwards


@pytest.mark.parametrize(
    "mode, quantized, vllm_mode, expected",
    [("auto", True, "colocate", "lora"), ("auto", False, "server", "merge"), ("merge", True, "server", "merge")],
)
def test_resolve_sync_mode(mode, quantized, vllm_mode, expected):
    assert vllm_sync.resolve_sync_mode(mode, quantized, vllm_mode) == expected


def test_lora_sync_rejects_server_mode():
    with pytest.raises(ValueError, match="needs vllm_mode='colocate'"):
        vllm_sync.resolve_sync_mode("lora", True, "server")


def test_prm_config_may_not_save_whole_modules_with_vllm():
    # Without vLLM the PRM keeps its own copies (tests/test_grpo_compat.py); TRL's vLLM sync knows only the policy's.
    config = LoraConfig(r=4, target_modules="all-linear", modules_to_save=["embed_tokens"])
    assert default_prm_lora_config(config, use_vllm=True).modules_to_save is None
    assert default_prm_lora_config(config).modules_to_save == ["embed_tokens"]
    from prime_trl.algo.prm import check_lora_config

    check_lora_config(config, "PRM")
    with pytest.raises(ValueError, match=r"modules_to_save=\['embed_tokens'\] and use_vllm=True"):
        check_lora_config(config, "PRM", use_vllm=True)


def test_exported_dir_is_a_peft_adapter(two_adapter_model, tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_sync, "make_lora_request", lambda *args: args)
    sync = vllm_sync.LoRAAdapterSync(two_adapter_model, tmp_path)
    sync.sync()
    config = LoraConfig.from_pretrained(str(Path(tmp_path) / "v1"))
    assert config.r == 4 and config.inference_mode


@pytest.mark.parametrize("main", [True, False])
def test_lora_sync_with_several_processes_has_one_writer(two_adapter_model, tmp_path, monkeypatch, main):
    """Every process syncs together; only the main one writes or deletes exports, and all wait for the write."""
    monkeypatch.setattr(vllm_sync, "make_lora_request", lambda *args: args)
    events = []
    sync = vllm_sync.LoRAAdapterSync(
        two_adapter_model,
        tmp_path,
        keep=1,
        is_main_process=main,
        wait_for_everyone=lambda: events.append(("wait", (tmp_path / f"v{sync.version}").is_dir())),
    )
    if not main:  # what the main process wrote earlier must survive a non-main process's sync
        (tmp_path / "v1").mkdir()
    sync.sync()
    sync.sync()
    # The main process has written the export by the time everyone waits; the others never write.
    assert events == [("wait", True), ("wait", main)]  # v1: written by main (here or before); v2: by main only
    assert (tmp_path / "v1").is_dir() != main  # stale export removed by the main process only
    assert sync.request[2] == tmp_path / "v2"
