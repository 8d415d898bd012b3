from __future__ import annotations

import json

import pytest
import torch

from dsfuse.checkpoint import CheckpointMeta, MODEL_KINDS, load_checkpoint, read_metadata, save_checkpoint
from dsfuse.errors import UsageError
from toy_model import ToyConfig, ToyRegressor


@pytest.fixture
def saved(tmp_path):
    model = ToyRegressor(ToyConfig(in_features=5, hidden=7))
    path = save_checkpoint(tmp_path / "model.safetensors", model, CheckpointMeta.of("toy", model.config, classes=("a",)))
    return model, path


def test_round_trip_rebuilds_from_config_alone(saved):
    model, path = saved
    loaded, meta = load_checkpoint(path, kind="toy")
    assert meta.kind == "toy" and meta.config["hidden"] == 7 and meta.classes == ("a",)
    x = torch.randn(3, 5)
    assert torch.equal(model.eval()(x), loaded(x))


def test_run_directory_stands_for_its_model_file(saved):
    _, path = saved
    loaded, _ = load_checkpoint(path.parent)
    assert isinstance(loaded, ToyRegressor)


def test_wrong_kind_is_refused(saved, monkeypatch):
    _, path = saved
    with pytest.raises(UsageError, match="holds a 'toy' model, expected vqvae"):
        load_checkpoint(path, kind="vqvae")


def test_truncated_file_is_refused(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError) as err:
        load_checkpoint(path)
    assert err.value.exit_code == 2


def test_garbage_and_pickle_files_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(UsageError, match="not a readable safetensors"):
        read_metadata(junk)
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(UsageError, match="refusing a pickle"):
        load_checkpoint(pickled)


def test_safetensors_without_dsfuse_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(UsageError, match="not a dsfuse checkpoint"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_atomic_write_leaves_old_file_on_failure(saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("dsfuse.checkpoint._save_weights", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, model, CheckpointMeta.of("toy", model.config))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]


def test_class_names_are_refused_when_missing_or_not_matching_the_outputs(tmp_path):
    model = ToyRegressor(ToyConfig())
    for classes, config in [((), {"num_classes": 2}), (("a", "b", "c"), {"num_classes": 2})]:
        path = save_checkpoint(tmp_path / "m.safetensors", model, CheckpointMeta("toy", config, classes))
        with pytest.raises(UsageError, match="no class names for its outputs"):
            read_metadata(path).class_names(path)
    save_checkpoint(tmp_path / "m.safetensors", model, CheckpointMeta("toy", {"num_classes": 2}, ("a", "b")))
    assert read_metadata(tmp_path / "m.safetensors").class_names("x") == ["a", "b"]


def test_metadata_of_the_wrong_shape_is_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    for metadata, name in [({"kind": "toy", "config": "[1]"}, "config"),
                           ({"kind": "toy", "config": "{}", "classes": "{not json"}, "classes"),
                           ({"kind": "toy", "config": "{}", "classes": "[1, 2]"}, "classes"),
                           ({"kind": "toy", "config": "{}", "options": "3"}, "options")]:
        save_file({"w": torch.zeros(2)}, path, metadata=metadata)
        with pytest.raises(UsageError, match=f"metadata '?{name}'? is not"):
            read_metadata(path)


def test_every_registered_kind_points_at_a_model_with_a_config():
    from dsfuse.checkpoint import model_class

    for kind in MODEL_KINDS:
        cls = model_class(kind)
        assert hasattr(cls, "Config"), kind


def test_checkpoints_of_dsfuse_0_1_keep_their_class_names_options_and_setup(tmp_path):
    from safetensors.torch import save_model

    path = tmp_path / "old.safetensors"
    extra = {"classes": ["angry", "calm"], "labels": "ravdess", "speaker_norm": True, "diffusion": {"schedule": "cosine"}}
    save_model(ToyRegressor(ToyConfig()), str(path), metadata={"kind": "toy", "config": "{}", "extra": json.dumps(extra)})
    meta = read_metadata(path)
    assert meta.classes == ("angry", "calm") and meta.options == {"labels": "ravdess", "speaker_norm": True}
    assert meta.setup == {"schedule": "cosine"}


def test_a_config_the_file_does_not_back_is_refused_before_building(tmp_path):
    """A 400-byte file claiming a 10^8-code codebook: refused from the header, nothing allocated."""
    import resource

    from dsfuse.models.vqvae import VQVAE, VQVAEConfig

    cfg = VQVAEConfig(image_size=32, downsample=8, codebook_size=64, base_channels=8, latent_channels=4)
    path = save_checkpoint(tmp_path / "vq.safetensors", VQVAE(cfg), CheckpointMeta.of("vqvae", cfg))
    bomb = CheckpointMeta.of("vqvae", {**read_metadata(path).config, "codebook_size": 100_000_000})
    save_checkpoint(tmp_path / "bomb.safetensors", VQVAE(cfg), bomb)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UsageError, match=r"tensor quantizer\..* has shape \[64, 4\], the config needs \[100000000, 4\]"):
        load_checkpoint(tmp_path / "bomb.safetensors")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: far below 1.6 GB
    missing = CheckpointMeta.of("vqvae", {**read_metadata(path).config, "base_channels": 16})
    save_checkpoint(tmp_path / "wide.safetensors", torch.nn.Linear(1, 1), missing)
    with pytest.raises(UsageError, match="lacks the tensor"):
        load_checkpoint(tmp_path / "wide.safetensors")


def test_outputs_get_the_usual_permissions(saved):
    import os
    import stat

    _, path = saved
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
