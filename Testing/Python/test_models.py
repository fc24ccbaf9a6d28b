"""Model registry: the bundled model verifies and loads; wrong files give errors that name the file."""

from __future__ import annotations

import pytest
import torch

from liversam.errors import ModelError
from liversam.models import (
    LIVERSAM_CHECKPOINT_FORMAT,
    MODEL_SPECS,
    available_models,
    load_model,
    register_user_model,
    resolve_device,
)


def test_bundled_model_is_verified_and_frozen(litemedsam):
    assert litemedsam.spec.name == "litemedsam" and litemedsam.input_size == 256
    assert litemedsam.low_res_mask_size == 256
    assert not any(p.requires_grad for p in litemedsam.network.parameters())
    names = {m.name for m in available_models()}
    assert {"litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"} <= names


def test_missing_official_checkpoint_names_file_and_address(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVERSAM_HOME", str(tmp_path))
    with pytest.raises(ModelError) as info:
        load_model("sam_vit_b", device="cpu")
    message = str(info.value)
    assert "sam_vit_b_01ec64.pth" in message and MODEL_SPECS["sam_vit_b"].url in message


def test_wrong_file_for_official_model_is_rejected_by_sha256(tmp_path):
    wrong = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"w": torch.zeros(3)}, wrong)
    with pytest.raises(ModelError, match="SHA-256") as info:
        load_model(f"sam_vit_b={wrong}", device="cpu")
    assert str(wrong) in str(info.value) and "dl.fbaipublicfiles.com" in str(info.value)


def test_unknown_checkpoint_file_and_unknown_name(tmp_path):
    junk = tmp_path / "random.pth"
    torch.save({"w": torch.zeros(3)}, junk)
    with pytest.raises(ModelError, match="neither a LiverSAM training checkpoint"):
        load_model(str(junk), device="cpu")
    with pytest.raises(ModelError, match="Unknown model 'no_such_model'"):
        load_model("no_such_model", device="cpu")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ModelError, match="is not a PyTorch checkpoint: it is a text file"):
        load_model(str(text), device="cpu")


def test_a_file_that_is_no_checkpoint_says_what_it_is_without_torchs_unsafe_advice(tmp_path, data_dir):
    """A CT given as --model quoted torch's "re-running with weights_only=False will likely succeed" (code execution)."""
    with pytest.raises(ModelError) as error:
        load_model(str(data_dir / "lits117" / "ct.nii.gz"), device="cpu")
    message = str(error.value)
    assert "is not a PyTorch checkpoint: it holds a gzip-compressed NIfTI image" in message
    assert "weights_only" not in message


class _CodeOnLoad:
    """Unpickling this calls ``pathlib.Path.touch``: code a weights-only load must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"format": LIVERSAM_CHECKPOINT_FORMAT, "payload": _CodeOnLoad(str(marker))}, evil)
    with pytest.raises(ModelError, match="weights-only") as error:
        load_model(str(evil), device="cpu")
    assert not marker.exists()
    assert "pickled Python objects beyond plain weights" in str(error.value)
    assert "weights_only" not in str(error.value)  # torch's advice to load it unsafely is not passed on


def test_liversam_checkpoint_round_trip_and_registry(tmp_path, monkeypatch, litemedsam, caplog):
    monkeypatch.setenv("LIVERSAM_HOME", str(tmp_path / "home"))
    state = {k: v.clone() for k, v in litemedsam.network.state_dict().items()}
    key = "mask_decoder.iou_prediction_head.layers.0.bias"
    state[key] += 1.0
    path = tmp_path / "finetuned.pth"
    torch.save({"format": LIVERSAM_CHECKPOINT_FORMAT, "base_model": "litemedsam", "model_state": state,
                "metadata": {"name": "my_liver_model", "epochs": 3}}, path)
    loaded = load_model(str(path), device="cpu")
    assert loaded.name == "my_liver_model" and loaded.metadata["base_model"] == "litemedsam"
    assert torch.equal(loaded.network.state_dict()[key], state[key])
    register_user_model("my_liver_model", path, description="test")
    assert any(m.name == "my_liver_model" and m.available for m in available_models())
    assert load_model("my_liver_model", device="cpu").source == str(path)
    with pytest.raises(ModelError, match="built-in"):
        register_user_model("litemedsam", path)
    other = tmp_path / "run2" / "best.pt"  # another run under the same name (e.g. the default, its folder's name)
    other.parent.mkdir()
    other.write_bytes(path.read_bytes())
    with caplog.at_level("WARNING", logger="liversam.models.registry"):
        register_user_model("my_liver_model", other)
    assert f"it named '{path.resolve()}'" in caplog.text, caplog.text  # it was replaced without a word
    assert load_model("my_liver_model", device="cpu").source == str(other.resolve())


def test_models_registered_at_the_same_time_are_all_kept(tmp_path, monkeypatch):
    import threading
    import time

    from liversam.models import registry

    monkeypatch.setenv("LIVERSAM_HOME", str(tmp_path / "home"))
    read = registry.registered_models

    def slow_read():  # widen the window between reading the list and writing it back
        models = read()
        time.sleep(0.2)
        return models

    monkeypatch.setattr(registry, "registered_models", slow_read)
    checkpoints = []
    for n in range(4):
        checkpoints.append(tmp_path / f"run{n}.pt")
        checkpoints[-1].write_bytes(b"x")
    runs = [threading.Thread(target=register_user_model, args=(f"run{n}", checkpoints[n])) for n in range(4)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    # before: each run wrote back the list it had read, and the registry kept one of the four
    assert sorted(m.name for m in read()) == ["run0", "run1", "run2", "run3"]


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ModelError, match="Unknown device"):
        resolve_device("tpu")


def test_a_damaged_checkpoint_is_not_called_pickled_code(tmp_path):
    """Torch reports every failure of its weights-only reader as "Weights only load failed": a damaged file was
    described as holding classes or functions (and told to save a state_dict)."""
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"\x80\x02" + b"\xa3" * 50)  # a pickle's start, then an opcode that does not exist
    with pytest.raises(ModelError) as error:
        load_model(str(damaged), device="cpu")
    assert "it cannot be read as plain weights (Unsupported operand 163): the file is damaged" in str(error.value)
    assert "pickled Python objects" not in str(error.value) and "weights_only" not in str(error.value)


def test_a_safetensors_file_or_an_lfs_pointer_is_named_as_such(tmp_path):
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    safetensors = tmp_path / "model.pth"
    safetensors.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    with pytest.raises(ModelError, match="it is a safetensors file"):
        load_model(str(safetensors), device="cpu")
    pointer = tmp_path / "lfs.pth"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ModelError, match="it is a Git LFS pointer, not the weights themselves"):
        load_model(str(pointer), device="cpu")
