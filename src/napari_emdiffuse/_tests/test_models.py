import os
import pickle

import numpy as np
import pytest
import torch

from napari_emdiffuse.core.models import ModelFileError, list_models, load_model, read_metadata, save_model
from napari_emdiffuse.core.network import UNet, UNetConfig


def test_save_and_load_round_trip(tmp_path):
    net = UNet(UNetConfig(base=8, mults=(1, 2)))
    path = save_model(net, {"task": "denoise", "name": "mine", "sampling": {"steps": 4}}, tmp_path / "mine.npz")
    model = load_model(path)
    assert model.task == "denoise" and model.name == "mine" and model.sampling["steps"] == 4
    for key, value in net.state_dict().items():
        np.testing.assert_allclose(model.net.state_dict()[key].numpy(), value.numpy(), atol=1e-3)
    assert read_metadata(path)["network"]["base"] == 8
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]  # atomic: no temporary left


class Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["EMDIFFUSE_PWNED_DIR"],))


def test_a_model_file_with_a_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("EMDIFFUSE_PWNED_DIR", str(marker))
    path = tmp_path / "evil.npz"
    np.savez(path, __meta__=np.array([Payload()], dtype=object), weight=np.zeros(3))
    assert pickle.loads(pickle.dumps(Payload())) is None and marker.exists()  # the payload really works...
    marker.rmdir()
    with pytest.raises(ModelFileError, match="pickled objects"):
        load_model(path)
    assert not marker.exists()  # ...but loading the model never ran it


def test_a_torch_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(ModelFileError):
        load_model(path)


def test_truncated_and_mismatched_files_give_clear_errors(tmp_path):
    net = UNet(UNetConfig(base=8, mults=(1, 2)))
    good = save_model(net, {"task": "denoise"}, tmp_path / "good.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ModelFileError, match="damaged or truncated"):
        load_model(truncated)
    other = UNet(UNetConfig(base=8, mults=(1, 2, 2)))
    mismatched = save_model(other, {"task": "denoise"}, tmp_path / "mismatched.npz")
    data = dict(np.load(mismatched))
    data["__meta__"] = np.load(good)["__meta__"]
    np.savez(mismatched, **data)
    with pytest.raises(ModelFileError, match="does not match"):
        load_model(mismatched)
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "missing.npz")
    with pytest.raises(ModelFileError, match="No model named"):
        load_model("no-such-model")


def test_user_models_are_listed_and_found_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("EMDIFFUSE_MODELS_DIR", str(tmp_path))
    save_model(UNet(UNetConfig(base=8, mults=(1, 2))), {"task": "denoise", "description": "x"}, tmp_path / "u1.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    names = [e.name for e in list_models("denoise")]
    assert "u1" in names and "junk" not in names
    assert load_model("u1").name == "u1"
    assert [e for e in list_models() if e.bundled], "the package ships at least one model"
