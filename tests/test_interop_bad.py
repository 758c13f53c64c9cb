"""Bad adapter files: each a clear error naming the file or key, the model untouched; and `convert`."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from conftest import save_tiny_folder

import llama_adapter as la
from llama_adapter import interop
from llama_adapter.cli import build_parser, main


@pytest.fixture
def tiny(tmp_path):
    folder = save_tiny_folder(tmp_path / "tiny")  # dim 64, 4 layers, 4 heads, 2 key/value heads
    model, tok = la.load_pretrained(folder)
    return model, folder


def v1_release(dim: int = 64, heads: int = 4, layers: int = 4, n_adapted: int = 2) -> dict:
    state = {"adapter_query.weight": torch.randn(n_adapted * 10, dim)}
    state.update({f"layers.{i}.attention.gate": torch.randn(1, heads, 1, 1) for i in range(layers)})
    return state


class RunsCode:
    """Unpickling this would run a (harmless) shell command that leaves a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_truncated_pth_is_a_clear_error(tiny, tmp_path):
    model, _ = tiny
    path = tmp_path / "adapter.pth"
    torch.save(v1_release(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"adapter.pth is not a readable .pth file \(truncated or corrupt\)"):
        interop.load_adapter(model, path)
    assert model.adapter is None


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_with_code_is_refused_and_never_runs(tiny, tmp_path, legacy):
    model, _ = tiny
    marker = tmp_path / "ran"
    state = {**v1_release(), "payload": RunsCode(str(marker))}
    path = tmp_path / "evil.pth"
    if legacy:  # a plain pickle file, not torch's zip format
        path.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, path)
    with pytest.raises(ValueError, match=r"evil.pth refused: it needs more than tensors to load"):
        interop.load_adapter(model, path)
    with pytest.raises(ValueError, match="refused"):
        interop.detect_format(path)
    assert not marker.exists()
    assert model.adapter is None


def test_mismatched_shapes_name_the_key_and_both_shapes(tiny, tmp_path):
    model, _ = tiny
    torch.save(v1_release(dim=32), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match=r"adapter_query.weight has shape \(20, 32\), but this base model needs "
                                         r"\(20, 64\)"):
        interop.load_adapter(model, tmp_path / "narrow.pth")
    torch.save(v1_release(heads=8), tmp_path / "heads.pth")
    with pytest.raises(ValueError, match=r"layers.0.attention.gate has shape \(1, 8, 1, 1\), but this base model "
                                         r"needs \(1, 4, 1, 1\)"):
        interop.load_adapter(model, tmp_path / "heads.pth")
    torch.save(v1_release(layers=6, n_adapted=5), tmp_path / "deep.pth")
    with pytest.raises(ValueError, match=r"prompts for 5 layers, but this base model has 4"):
        interop.load_adapter(model, tmp_path / "deep.pth")
    assert model.adapter is None  # nothing was attached by a refused file


def test_mismatched_peft_lora_shape_is_refused_before_loading(tiny, tmp_path):
    from safetensors.torch import save_file

    model, _ = tiny
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, '
                                                '"target_modules": ["q_proj"]}')
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 48),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(2, 48\), but this base model needs "
                                         r"\(2, 64\)"):
        interop.load_adapter(model, folder)
    assert model.adapter is None


def test_unknown_formats_are_named(tiny, tmp_path):
    model, _ = tiny
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth: unknown adapter format \(keys \['encoder.weight'\]"):
        interop.load_adapter(model, tmp_path / "other.pth")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(ValueError, match="PEFT adapter type 'PREFIX_TUNING' is not supported"):
        interop.load_adapter(model, tmp_path / "folder")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown adapter format"):
        interop.load_adapter(model, tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="unknown adapter format 'gguf'"):
        interop.load_adapter(model, tmp_path / "other.pth", format="gguf")
    with pytest.raises(FileNotFoundError, match="no adapter at .*adapter_config.json"):
        interop.load_adapter(model, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json in it"):
        interop.load_adapter(model, tmp_path)
    with pytest.raises(TypeError, match="pass the tokenizer as tokenizer="):
        interop.load_adapter(model, tmp_path / "other.pth", object())  # type: ignore[arg-type]


def test_peft_options_we_cannot_represent_are_refused(tiny, tmp_path):
    model, _ = tiny
    folder = tmp_path / "dora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true}')
    (folder / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is not a readable safetensors file"):
        interop.load_adapter(model, folder)
    from safetensors.torch import save_file

    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="cannot represent: use_dora=True"):
        interop.load_adapter(model, folder)


def test_convert_cli_release_to_ours_and_back_into_a_model(tiny, tmp_path, capsys):
    model, folder = tiny
    torch.save(v1_release(), tmp_path / "release.pth")
    rc = main(["convert", str(tmp_path / "release.pth"), "--out", str(tmp_path / "ours"), "--model", str(folder)])
    assert rc == 0 and "wrote the adapter (ours format)" in capsys.readouterr().out
    interop.load_adapter(model, tmp_path / "release.pth")
    converted, _ = la.load_pretrained(folder)
    interop.load_adapter(converted, tmp_path / "ours")
    ids = torch.tensor([[1, 7, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids), model(ids))
    # a release names no base model: without --model, a clear error
    assert main(["convert", str(tmp_path / "release.pth"), "--out", str(tmp_path / "x")]) == 2
    assert "does not name its base model" in capsys.readouterr().err


def test_convert_cli_choices_are_the_interop_formats():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    conv = sub.choices["convert"]
    choices = {a.dest: a.choices for a in conv._actions}
    assert tuple(choices["from_format"]) == interop.FORMATS and tuple(choices["to"]) == interop.SAVE_FORMATS
