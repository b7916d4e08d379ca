"""Hub ids for weights and exports, and exports in the Hub layout (issue 21).

Every Hub repo here is a tiny stand-in laid out in a Hub cache directory as huggingface_hub lays out
what it downloads; HF_HUB_OFFLINE=1 throughout, so nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants, scan_cache_dir
from huggingface_hub.file_download import repo_folder_name
from safetensors.torch import load_file, save_file

from chatterbox.model.chatterbox import ChatterBox
from chatterbox.model.hub import HubId, parse_hub_id
from chatterbox.model.weights import WeightsError
from tests.conftest import REPO_ROOT, tiny_upstream_policy
from tests.test_model_chatterbox import build_tiny
from tests.test_model_weights import write_llava_folder

EXPORT_ID = "someone/chatterbox-tiny"
MAIN_COMMIT = hashlib.sha1(b"main").hexdigest()
V1_COMMIT = hashlib.sha1(b"v1").hexdigest()


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str, ref: str,
                     tree_listing: bool = True) -> Path:
    """Lay ``folder`` out in ``cache`` as huggingface_hub does after downloading it at ``commit``: contents in
    blobs/<git blob id>, snapshots/<commit>/<path in repo> linking to them, refs/<ref> holding the commit, and
    (huggingface_hub 1.x; ``tree_listing``) the repo's file listing at that commit in trees/<commit>.json."""
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    listing = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / blob_id
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        listing[file.relative_to(folder).as_posix()] = {"size": len(data), "blob_id": blob_id}
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    if tree_listing:
        (repo / "trees").mkdir(exist_ok=True)
        (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return repo / "snapshots" / commit


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    """huggingface_hub read HF_HOME / HF_HUB_OFFLINE when imported: point its constants at a fresh cache."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def exports(module_tokenizer, tmp_path_factory) -> dict[str, tuple[ChatterBox, Path]]:
    """Two exports of the tiny model with different weights: "main" in shards, "v1" in one file."""
    root = tmp_path_factory.mktemp("exports")
    main = build_tiny(module_tokenizer)
    v1 = build_tiny(module_tokenizer)
    with torch.no_grad():
        for param in v1.query_head.parameters():
            param.add_(1.0)
    return {"main": (main, main.save_pretrained(root / "main", max_shard_size="1MB")),
            "v1": (v1, v1.save_pretrained(root / "v1"))}


def cache_exports(cache: Path, exports) -> None:
    put_in_hub_cache(cache, EXPORT_ID, exports["main"][1], MAIN_COMMIT, "main")
    put_in_hub_cache(cache, EXPORT_ID, exports["v1"][1], V1_COMMIT, "v1", tree_listing=False)


def assert_same_weights(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_hub_id_syntax():
    assert parse_hub_id("openai/clip-vit-large-patch14") == HubId("openai/clip-vit-large-patch14")
    assert parse_hub_id("owner/name@v1.0") == HubId("owner/name", "v1.0")
    assert parse_hub_id("ShilongLiu/GroundingDINO@refs/pr/3:weights/g.pth") == HubId(
        "ShilongLiu/GroundingDINO", "refs/pr/3", "weights/g.pth")
    assert parse_hub_id("ShilongLiu/GroundingDINO:groundingdino_swinb_cogcoor.pth") == HubId(
        "ShilongLiu/GroundingDINO", None, "groundingdino_swinb_cogcoor.pth")
    for not_an_id in ("/models/clip", "weights/a/b", "clip", "owner/name:/abs.pth", "owner--x/name", "owner/name@"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_the_test_cache_is_the_layout_huggingface_hub_reads(hub_cache, exports):
    cache_exports(hub_cache, exports)
    info = scan_cache_dir(hub_cache)
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == EXPORT_ID
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {MAIN_COMMIT: {"main"}, V1_COMMIT: {"v1"}}


def test_an_export_loads_by_hub_id_at_any_revision(hub_cache, exports):
    from chatterbox.train.run import resolve_init_export

    cache_exports(hub_cache, exports)
    for hub_id, name in [(EXPORT_ID, "main"), (f"{EXPORT_ID}@v1", "v1"), (f"{EXPORT_ID}@{V1_COMMIT}", "v1")]:
        assert_same_weights(ChatterBox.from_pretrained(hub_id), exports[name][0])
    snapshot = hub_cache / repo_folder_name(repo_id=EXPORT_ID, repo_type="model") / "snapshots" / V1_COMMIT
    assert resolve_init_export(f"{EXPORT_ID}@v1") == snapshot


def test_an_evaluation_of_an_export_by_id_is_fingerprinted_by_its_commit(hub_cache, exports):
    from argparse import Namespace

    from chatterbox.config import load_config
    from chatterbox.eval.runner import run_fingerprint

    cache_exports(hub_cache, exports)
    fingerprint = run_fingerprint(Namespace(checkpoint=f"{EXPORT_ID}@v1", seed=0), load_config("tiny_stage2"))
    snapshot = hub_cache / repo_folder_name(repo_id=EXPORT_ID, repo_type="model") / "snapshots" / V1_COMMIT
    assert fingerprint["checkpoint"] == str(snapshot.resolve())
    assert set(fingerprint["checkpoint_files"]) == {p.name for p in exports["v1"][1].iterdir() if p.is_file()}


def test_hf_home_points_a_fresh_process_at_its_cache(exports, tmp_path):
    """No constant patched: the variables alone, read by huggingface_hub at import."""
    cache_exports(tmp_path / "hf" / "hub", exports)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    code = ("import sys, torch\nfrom chatterbox import ChatterBox\n"
            f"torch.save(ChatterBox.from_pretrained({EXPORT_ID + '@v1'!r}).state_dict(), sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "state.pt")], cwd=REPO_ROOT, env=env, check=True,
                   timeout=300)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    expected = exports["v1"][0].state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())


def test_base_weights_by_hub_id_build_what_their_local_paths_build(hub_cache, tmp_path, tiny_tokenizer_dir):
    from model.GroundingDINO import VisionBranch
    from transformers import CLIPVisionModel

    from chatterbox.model.clip_tower import clip_vision_config

    cfg = tiny_upstream_policy()
    torch.manual_seed(5)  # other values than the model's own initialisation, so that loading shows
    llava, clip, gdino = tmp_path / "llava", tmp_path / "clip", tmp_path / "gdino"
    write_llava_folder(llava, cfg)
    for file in tiny_tokenizer_dir.iterdir():  # a LLaVA repo carries its tokenizer
        shutil.copy(file, llava)
    clip_model = CLIPVisionModel(clip_vision_config(cfg.clip))
    clip_model.save_pretrained(str(clip))  # model.safetensors
    gdino.mkdir()
    torch.save(VisionBranch(cfg.vision).state_dict(), gdino / "groundingdino_tiny.pth")
    put_in_hub_cache(hub_cache, "liuhaotian/llava-tiny", llava, MAIN_COMMIT, "main")
    put_in_hub_cache(hub_cache, "openai/clip-tiny", clip, MAIN_COMMIT, "main")
    put_in_hub_cache(hub_cache, "ShilongLiu/GroundingDINO", gdino, MAIN_COMMIT, "main")

    def build(llm_path: str, clip_path: str, vision_weights: str) -> ChatterBox:
        model_cfg = tiny_upstream_policy()
        model_cfg.language.llm_path, model_cfg.clip.clip_path, model_cfg.vision_weights = (
            llm_path, clip_path, vision_weights)
        torch.manual_seed(0)
        return ChatterBox.build(model_cfg, verbose=False)  # the tokenizer from llm_path too

    local = build(str(llava), str(clip), str(gdino / "groundingdino_tiny.pth"))
    by_id = build("liuhaotian/llava-tiny", "openai/clip-tiny", "ShilongLiu/GroundingDINO:groundingdino_tiny.pth")
    assert_same_weights(by_id, local)
    assert by_id.tokenizer.get_vocab() == local.tokenizer.get_vocab()
    assert torch.equal(by_id.clip_tower.vision_model.embeddings.patch_embedding.weight,
                       clip_model.embeddings.patch_embedding.weight)


@pytest.mark.parametrize("key, value, problem", [
    ("clip.clip_path", "openai/clip-vit-large-patch14", "not in the Hub cache {cache} (HF_HUB_OFFLINE=1)"),
    ("language.tokenizer_path", "someone/tokenizer@v2", "not in the Hub cache {cache} (HF_HUB_OFFLINE=1)"),
    ("language.llm_path", "/models/llava-llama-2-13b", "not a Hub id (owner/name[@revision][:path/in/repo])"),
])
def test_a_weight_path_neither_local_nor_cached_is_one_line_naming_its_key(hub_cache, key, value, problem):
    cfg = tiny_upstream_policy()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(WeightsError) as error:
        ChatterBox.build(cfg, verbose=False)
    assert str(error.value) == f"model.{key}={value!r}: no such local path, and {problem.format(cache=hub_cache)}"


def test_a_hub_id_of_the_wrong_kind_names_the_syntax(hub_cache):
    from chatterbox.model import hub

    with pytest.raises(WeightsError) as error:
        hub.resolve_file("ShilongLiu/GroundingDINO", "model.vision_weights")
    assert str(error.value) == ("model.vision_weights='ShilongLiu/GroundingDINO': model.vision_weights is one file; "
                                "a Hub id names it as owner/name[@revision]:path/in/repo")
    with pytest.raises(WeightsError) as error:
        hub.resolve_model_folder("openai/clip-vit-large-patch14:model.safetensors", "model.clip.clip_path")
    assert str(error.value) == ("model.clip.clip_path='openai/clip-vit-large-patch14:model.safetensors': names one "
                                "file of a Hub repo, but model.clip.clip_path is a folder (owner/name[@revision])")


def test_an_export_id_not_or_partly_cached_is_one_line(hub_cache, exports):
    from chatterbox.train.run import resolve_init_export

    cache_exports(hub_cache, exports)
    with pytest.raises(WeightsError) as error:
        ChatterBox.from_pretrained(f"{EXPORT_ID}@v2")
    assert str(error.value) == (f"export='{EXPORT_ID}@v2': no such local path, and not in the Hub cache {hub_cache} "
                                "(HF_HUB_OFFLINE=1)")
    snapshot = hub_cache / repo_folder_name(repo_id=EXPORT_ID, repo_type="model") / "snapshots" / MAIN_COMMIT
    next(snapshot.glob("model-*.safetensors")).unlink()  # an interrupted download, told by the tree listing
    with pytest.raises(WeightsError) as error:
        ChatterBox.from_pretrained(EXPORT_ID)
    assert str(error.value) == (f"export='{EXPORT_ID}': no such local path, and only partly in the Hub cache "
                                f"{hub_cache} (HF_HUB_OFFLINE=1)")
    with pytest.raises(WeightsError) as error:
        resolve_init_export("outputs/13b_stage1")
    assert str(error.value) == (f"train.init_from='outputs/13b_stage1': no such local path, and not in the Hub cache "
                                f"{hub_cache} (HF_HUB_OFFLINE=1); run stage 1 first or point init_from at its output "
                                "directory")


def test_a_small_max_shard_size_writes_shards_with_an_index_that_load_back(exports):
    model, folder = exports["main"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                          for i in range(1, len(shards) + 1)]
    assert sorted(set(index["weight_map"].values())) == shards
    assert not (folder / "model.safetensors").exists()
    in_shards = {}
    for shard in shards:
        tensors = load_file(str(folder / shard))
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 1_000_000
        in_shards.update(tensors)
    assert set(in_shards) == set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in in_shards.values())
    assert_same_weights(ChatterBox.from_pretrained(folder), model)
    single = exports["v1"][1]
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()


def test_an_export_carries_a_model_card_with_hub_metadata(module_tokenizer, tmp_path):
    model = build_tiny(module_tokenizer)
    model.cfg.language.llm_path = "liuhaotian/llava-llama-2-13b-chat-lightning-preview"
    model.cfg.clip.clip_path = "openai/clip-vit-large-patch14"
    model.cfg.vision_weights = "ShilongLiu/GroundingDINO:groundingdino_swinb_cogcoor.pth"
    for merge_lora in (False, True):
        folder = model.save_pretrained(tmp_path / f"merged_{merge_lora}", merge_lora=merge_lora)
        text = (folder / "README.md").read_text()
        assert text.startswith("---\n")
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "chatterbox" and card.data.license == "other"
        assert "chatterbox" in card.data.tags
        assert card.data.base_model == ["ShilongLiu/GroundingDINO",
                                        "liuhaotian/llava-llama-2-13b-chat-lightning-preview",
                                        "openai/clip-vit-large-patch14"]
        assert "ChatterBox.from_pretrained(" in card.text and "`openai/clip-vit-large-patch14`" in card.text
        llm_source = ("stored in this export" if merge_lora else
                      "`liuhaotian/llava-llama-2-13b-chat-lightning-preview`")
        assert f"* language model (LLaVA-LLaMA-2): {llm_source}" in card.text


def test_an_export_in_the_format_1_layout_still_loads(exports, tmp_path):
    """Format 1 (before the Hub layout): trainable.safetensors + base.safetensors, listed in export.json."""
    model, folder = exports["main"]
    old = Path(shutil.copytree(folder, tmp_path / "old"))
    tensors = {}
    for shard in old.glob("model*.safetensors"):
        tensors.update(load_file(str(shard)))
        shard.unlink()
    (old / "model.safetensors.index.json").unlink()
    (old / "README.md").unlink()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    save_file({k: v for k, v in tensors.items() if k in trainable}, str(old / "trainable.safetensors"))
    save_file({k: v for k, v in tensors.items() if k not in trainable}, str(old / "base.safetensors"))
    meta = json.loads((old / "export.json").read_text())
    (old / "export.json").write_text(json.dumps({**meta, "format": 1,
                                                 "files": ["trainable.safetensors", "base.safetensors"]}))
    assert_same_weights(ChatterBox.from_pretrained(old), model)
    model.save_pretrained(old)  # rewritten in the Hub layout: the old files must not be published with it
    assert not (old / "trainable.safetensors").exists() and not (old / "base.safetensors").exists()
    assert_same_weights(ChatterBox.from_pretrained(old), model)
