"""Saved datasets: bit-exact round trip, sharding, atomic writes, damaged folders, the built-in format."""

import json
import os

import pytest
import torch
from PIL import Image

import lora_core.data.saved_dataset as saved_dataset
from lora_core.data import (SampleInfo, SaveOptions, file_sha256, list_dataset_folders, load_dataset,
                            load_training_dataset, open_dataset, save_dataset)
from lora_core.errors import UserInputError


def _cond(seed, caption_dim=768):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, caption_dim, generator=g),
             {"pooled_output": torch.randn(1, caption_dim, generator=g), "width": 512, "strength": 0.5,
              "name": "clip_l", "attention_mask": None, "crop": (0, 0), "nested": [1, [2.5, "x"]],
              "dtype": torch.bfloat16}]]


def _samples(count=6, distinct=2):
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(4, 8 + 2 * (i % 2), 8, generator=g) for i in range(count)]
    latents[1] = latents[1].to(torch.bfloat16)
    # Each sample gets its own objects (as a text encoder would), equal in content per caption.
    conds = [_cond(i % distinct) for i in range(count)]
    info = [SampleInfo(caption=f"caption {i % distinct}", source_file=f"set/{i}.png", source_sha256="ab" * 32,
                       repeats=1 + i % 3, bucket=(64, 64 + 16 * (i % 2))) for i in range(count)]
    return latents, conds, info


def _assert_same_cond(a, b):
    assert len(a) == len(b)
    for (ta, da), (tb, db) in zip(a, b):
        assert torch.equal(ta, tb) and ta.dtype == tb.dtype
        assert da.keys() == db.keys()
        for key in da:
            if isinstance(da[key], torch.Tensor):
                assert torch.equal(da[key], db[key])
            else:
                assert da[key] == db[key] and type(da[key]) is type(db[key])


def test_round_trip_is_bit_exact_and_dedupes_conditioning(tmp_path):
    latents, conds, info = _samples()
    folder = save_dataset(tmp_path, "run1", latents, conds, info, SaveOptions(vae="sdxl_vae", text_encoder="clip_l+g"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["sample_count"] == 6
    assert manifest["vae"] == "sdxl_vae" and manifest["text_encoder"] == "clip_l+g"
    assert len(manifest["conds"]) == 2                      # two distinct captions
    from safetensors import safe_open
    with safe_open(str(folder / manifest["cond_shards"][0]), "pt") as f:
        assert len(list(f.keys())) == 4                     # 2 x (embedding + pooled)
    loaded = load_dataset(tmp_path, "run1")
    assert len(loaded.latents) == 6
    for original, back in zip(latents, loaded.latents):
        assert back.dtype == original.dtype and torch.equal(back, original)
    for original, back in zip(conds, loaded.conds):
        _assert_same_cond(original, back)
    assert [i.caption for i in loaded.info] == [i.caption for i in info]
    assert loaded.weights == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    assert loaded.info[1].bucket == (64, 80) and loaded.info[0].source_file == "set/0.png"
    assert loaded.vae == "sdxl_vae"
    comfy_latents, comfy_conds = loaded.to_comfy()
    assert comfy_latents[0]["samples"].shape == (1, 4, 8, 8) and comfy_conds[0] is loaded.conds[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary left


def test_shards_split_by_bytes_and_count(tmp_path):
    latents = [torch.full((4, 16, 16), float(i)) for i in range(10)]     # 4 KiB each
    save_dataset(tmp_path, "bybytes", latents, [[]], options=SaveOptions(shard_max_bytes=3 * 4096))
    manifest = json.loads((tmp_path / "bybytes" / "manifest.json").read_text())
    assert len(manifest["latent_shards"]) == 4               # 3 + 3 + 3 + 1
    save_dataset(tmp_path, "bycount", latents, [[]], options=SaveOptions(shard_max_samples=4))
    manifest = json.loads((tmp_path / "bycount" / "manifest.json").read_text())
    assert len(manifest["latent_shards"]) == 3
    loaded = load_dataset(tmp_path, "bycount")
    assert [float(l[0, 0, 0]) for l in loaded.latents] == [float(i) for i in range(10)]
    assert loaded.conds == [[]] * 10


def test_views_of_a_batch_can_be_saved(tmp_path):
    batch = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).reshape(2, 4, 8, 8)
    save_dataset(tmp_path, "views", [batch[0], batch[1]], [_cond(0)])
    loaded = load_dataset(tmp_path, "views")
    assert torch.equal(torch.stack(loaded.latents), batch)


def test_lazy_reader_reads_on_access(tmp_path):
    latents, conds, info = _samples()
    save_dataset(tmp_path, "lazy", latents, conds, info)
    with open_dataset(tmp_path, "lazy") as reader:
        assert len(reader) == 6
        assert torch.equal(reader.latent(3), latents[3])
        _assert_same_cond(reader.cond(5), conds[5])


def test_existing_folder_needs_overwrite_and_is_replaced_whole(tmp_path):
    latents, conds, info = _samples()
    save_dataset(tmp_path, "run", latents, conds, info)
    with pytest.raises(UserInputError, match="already exists.*overwrite"):
        save_dataset(tmp_path, "run", latents[:2], conds[:2])
    save_dataset(tmp_path, "run", latents[:2], conds[:2], options=SaveOptions(overwrite=True))
    assert len(load_dataset(tmp_path, "run").latents) == 2
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "mine.jpg").write_bytes(b"user data")
    with pytest.raises(UserInputError, match="left alone"):
        save_dataset(tmp_path, "photos", latents, conds, options=SaveOptions(overwrite=True))
    assert (tmp_path / "photos" / "mine.jpg").read_bytes() == b"user data"
    (tmp_path / "run" / "notes.txt").write_text("the user's own file inside a dataset folder")
    with pytest.raises(UserInputError, match="left alone"):
        save_dataset(tmp_path, "run", latents, conds, options=SaveOptions(overwrite=True))
    assert (tmp_path / "run" / "notes.txt").exists()
    (tmp_path / "empty").mkdir()
    save_dataset(tmp_path, "empty", latents[:1], conds[:1], options=SaveOptions(overwrite=True))


def test_unstorable_value_is_named_and_nothing_is_written(tmp_path):
    latents, conds, _ = _samples(count=3)
    conds[2] = [[conds[2][0][0], {"control": object(), "pooled_output": None}]]
    with pytest.raises(UserInputError, match=r"sample 2.*'control'.*builtins.object"):
        save_dataset(tmp_path, "bad", latents, conds)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_old_dataset_and_no_temporary(tmp_path, monkeypatch):
    latents, conds, info = _samples()
    save_dataset(tmp_path, "run", latents, conds, info)
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("cancelled")        # a BaseException, as ComfyUI's cancel is
        return original(tensors, path, metadata=metadata)

    original = saved_dataset.save_file
    monkeypatch.setattr(saved_dataset, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_dataset(tmp_path, "run", latents[:1], conds[:1], options=SaveOptions(overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert len(load_dataset(tmp_path, "run").latents) == 6


def test_mismatched_inputs_are_refused(tmp_path):
    latents, conds, info = _samples(count=3)
    with pytest.raises(UserInputError, match="3 latents but 2 conditionings"):
        save_dataset(tmp_path, "x", latents, conds[:2])
    with pytest.raises(UserInputError, match="split batches"):
        save_dataset(tmp_path, "x", [torch.zeros(4, 8)], [[]])
    with pytest.raises(UserInputError, match="empty"):
        save_dataset(tmp_path, "x", [], [])
    with pytest.raises(UserInputError, match=r"\.\."):
        save_dataset(tmp_path, "../x", latents, conds)
    with pytest.raises(UserInputError, match="subfolder"):
        save_dataset(tmp_path, ".", latents, conds)
    assert list(tmp_path.iterdir()) == []


def _saved(tmp_path):
    latents, conds, info = _samples()
    return save_dataset(tmp_path, "d", latents, conds, info, SaveOptions(shard_max_samples=3))


def test_missing_manifest(tmp_path):
    (_saved(tmp_path) / "manifest.json").unlink()
    with pytest.raises(UserInputError, match="no manifest.json"):
        load_dataset(tmp_path, "d")


def test_missing_shard(tmp_path):
    (_saved(tmp_path) / "latents-00001.safetensors").unlink()
    with pytest.raises(UserInputError, match=r"latents-00001.safetensors .* missing.*save the dataset again"):
        load_dataset(tmp_path, "d")


def test_newer_format_version(tmp_path):
    path = _saved(tmp_path) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserInputError, match="version 99.*update the node pack"):
        load_dataset(tmp_path, "d")


def test_shape_mismatch_and_damaged_files(tmp_path):
    folder = _saved(tmp_path)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["samples"][4]["latent_shape"] = [4, 9, 9]
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserInputError, match=r"Sample 4 .* \[4, 8, 8\].*\[4, 9, 9\]"):
        load_dataset(tmp_path, "d")
    path.write_text("{ not json")
    with pytest.raises(UserInputError, match="damaged"):
        load_dataset(tmp_path, "d")
    with pytest.raises(UserInputError, match="does not exist"):
        load_dataset(tmp_path, "nope")


def test_damaged_shard(tmp_path):
    folder = _saved(tmp_path)
    (folder / "latents-00000.safetensors").write_bytes(b"garbage bytes")
    with pytest.raises(UserInputError, match="latents-00000.safetensors cannot be read"):
        load_dataset(tmp_path, "d")


# --- ComfyUI's built-in SaveTrainingDataset layout ---------------------------------------------

def _write_builtin(folder, shard_size=2):
    """Exactly what comfy_extras/nodes_dataset.py SaveTrainingDataset writes."""
    folder.mkdir(parents=True)
    latents = [{"samples": torch.randn(1, 4, 8, 8)} for _ in range(5)]
    conditioning = [_plain_cond(i) for i in range(5)]
    shards = (len(latents) + shard_size - 1) // shard_size
    for shard in range(shards):
        data = {"latents": latents[shard * shard_size:(shard + 1) * shard_size],
                "conditioning": conditioning[shard * shard_size:(shard + 1) * shard_size]}
        with open(folder / f"shard_{shard:04d}.pkl", "wb") as f:
            torch.save(data, f)
    (folder / "metadata.json").write_text(json.dumps(
        {"num_samples": len(latents), "num_shards": shards, "shard_size": shard_size}))
    return latents, conditioning


def _plain_cond(seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]


def test_reads_builtin_format(tmp_path):
    latents, conditioning = _write_builtin(tmp_path / "builtin")
    loaded = load_training_dataset(tmp_path, "builtin")
    assert loaded.source_format.startswith("comfyui-builtin")
    assert len(loaded.latents) == 5
    for original, back in zip(latents, loaded.latents):
        assert torch.equal(back, original["samples"][0])
    for original, back in zip(conditioning, loaded.conds):
        _assert_same_cond(original, back)
    assert loaded.weights == [1.0] * 5


def test_builtin_format_missing_shard_and_unsafe_pickle(tmp_path):
    _write_builtin(tmp_path / "b")
    (tmp_path / "b" / "shard_0001.pkl").unlink()
    with pytest.raises(UserInputError, match="shard_0001.pkl"):
        load_training_dataset(tmp_path, "b")
    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / "shard_0000.pkl", "wb") as f:
        torch.save({"latents": [], "conditioning": [], "payload": Image.new("RGB", (1, 1))}, f)
    with pytest.raises(UserInputError, match="could run code"):
        load_training_dataset(tmp_path, "evil")


def test_our_format_through_the_common_entry_point_and_listing(tmp_path):
    latents, conds, info = _samples()
    save_dataset(tmp_path, "project/ours", latents, conds, info)
    _write_builtin(tmp_path / "theirs")
    (tmp_path / "unrelated").mkdir()
    assert list_dataset_folders(tmp_path) == ["project/ours", "theirs"]
    assert torch.equal(load_training_dataset(tmp_path, "project/ours").latents[2], latents[2])


def test_file_sha256(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    assert file_sha256(tmp_path / "a.bin") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_symlinked_dataset_folder_outside_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    latents, conds, info = _samples(count=2)
    save_dataset(tmp_path, "outside", latents, conds)
    root = tmp_path / "datasets"
    root.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(UserInputError, match="outside"):
        load_dataset(root, "link")


def test_video_latents_round_trip(tmp_path):
    latents = [torch.randn(16, 3, 8, 8), torch.randn(16, 5, 8, 8).to(torch.float16)]
    save_dataset(tmp_path, "video", latents, [_plain_cond(0), _plain_cond(1)])
    loaded = load_dataset(tmp_path, "video")
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(latents, loaded.latents))


def test_video_latents_keep_their_five_dimensions_and_frame_counts(tmp_path):
    g = torch.Generator().manual_seed(3)
    latents = [torch.randn(16, 9, 8, 12, generator=g), torch.randn(16, 1, 8, 8, generator=g)]  # 33-frame clip, image
    info = [SampleInfo(caption="a clip", source_file="clips/a.mp4", frames=33, repeats=2), SampleInfo(caption="still")]
    save_dataset(tmp_path, "video", latents, [_cond(0), _cond(1)], info)
    loaded = load_dataset(tmp_path, "video")
    assert [torch.equal(a, b) for a, b in zip(latents, loaded.latents)] == [True, True]
    assert [i.frames for i in loaded.info] == [33, 0] and loaded.weights == [2.0, 1.0]
    comfy_latents, _ = loaded.to_comfy()
    assert comfy_latents[0]["samples"].shape == (1, 16, 9, 8, 12)
    with pytest.raises(UserInputError, match="frames = -1"):
        save_dataset(tmp_path, "bad", latents[:1], [_cond(0)], [SampleInfo(frames=-1)])
