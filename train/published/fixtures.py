"""Tiny random checkpoints in the exact formats that CLIP-like models are published in, built offline.

Tests, the CI pipeline run and the benchmark need published-format teachers, but no hub is reachable here;
these builders write the same files a hub repository holds, with random weights and tiny shapes:

* ``open_clip_bert_folder``: an open_clip hf-hub folder like BiomedCLIP's (``open_clip_config.json`` +
  ``open_clip_pytorch_model.bin``): a timm ViT image tower and an HF BERT text tower whose config and WordPiece
  tokenizer come from a second repository (``bert_folder``), named by ``hf_model_name``.
* ``open_clip_bpe_folder``: an open_clip folder with open_clip's own ViT, text transformer and BPE tokenizer
  (QuiltNet's layout).
* ``hf_clip_folder``: a Hugging Face ``CLIPModel`` folder (PLIP's layout) with a ``CLIPTokenizer`` whose
  vocabulary and merges are the first merges of the BPE that open_clip ships, and a ``CLIPImageProcessor``.

``hub_cache_repo`` places any folder in a Hugging Face hub cache (``models--org--name/snapshots/<hash>/``),
which is what ``HF_HUB_OFFLINE=1`` reads.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

from contextlib import contextmanager
from typing import Iterator

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_WORDS = ("normal abnormal chest x ray radiograph lung lungs pneumonia opacity consolidation effusion heart "
          "cardiomegaly no acute findings finding study image tissue tumor tumour cancer benign malignant "
          "carcinoma adenocarcinoma squamous cell cells retina retinal fundus diabetic retinopathy grade mild "
          "moderate severe proliferative none the a an of with and in is are showing shows photo photograph "
          "micrograph histopathology slide ct mri scan brain ultrasound breast ecg report sinus rhythm").split()


def hub_cache_repo(cache: Path, repo_id: str, folder: Path) -> Path:
    """Copy ``folder`` into ``cache`` as the hub's snapshot of ``repo_id`` (refs/main -> a commit hash)."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@contextmanager
def offline_hub(cache: Path) -> Iterator[Path]:
    """Inside: hub look-ups read ``cache`` only (as ``HF_HUB_CACHE=cache HF_HUB_OFFLINE=1`` would arrange)."""
    import os

    from huggingface_hub import constants

    saved = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache), True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield Path(cache)
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved[:2]
        if saved[2] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[2]


def bert_folder(path: Path, hidden: int = 32, layers: int = 2, heads: int = 2, intermediate: int | None = None,
                vocab_size: int = 0) -> Path:
    """A random BERT with a WordPiece vocabulary written here (special tokens, letters, digits, medical words),
    padded with ``[unusedN]`` entries up to ``vocab_size`` (BERT-base: 30522) when that is larger."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,:;-()/%")
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters),
                                *_WORDS]))
    vocab += [f"[unused{i}]" for i in range(vocab_size - len(vocab))]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast.from_pretrained(path, do_lower_case=True).save_pretrained(path)  # reads vocab.txt
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate or 2 * hidden, max_position_embeddings=512)
    BertModel(config).save_pretrained(path)
    return path


def _write_open_clip(path: Path, model_cfg: dict, mean: tuple, std: tuple, seed: int) -> Path:
    import open_clip

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(mean), "std": list(std)}}
    (path / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{path}", load_weights=False)
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return path


def open_clip_bert_folder(path: Path, bert_id: str, embed_dim: int = 64, context_length: int = 256,
                          vision: str = "test_vit", image_size: int = 160, seed: int = 1) -> Path:
    """BiomedCLIP's layout: timm ViT + the HF text model ``bert_id`` (hub id or folder), MLP projection, and the
    text model's tokenizer files beside the weights (what ``local-dir:`` loading reads)."""
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"timm_model_name": vision, "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": image_size},
        "text_cfg": {"hf_model_name": bert_id, "hf_tokenizer_name": bert_id, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": context_length},
    }
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(bert_id).save_pretrained(path)  # as open_clip's push_to_hf_hub does
    return _write_open_clip(path, model_cfg, CLIP_MEAN, CLIP_STD, seed)


def open_clip_bpe_folder(path: Path, embed_dim: int = 48, width: int = 32, image_size: int = 32,
                         context_length: int = 32, seed: int = 2) -> Path:
    """QuiltNet's layout: open_clip's own ViT and text transformer, its BPE tokenizer (``SimpleTokenizer``)."""
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": width, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width, "heads": 2, "layers": 2},
    }
    return _write_open_clip(path, model_cfg, CLIP_MEAN, CLIP_STD, seed)


def _clip_bpe(path: Path, merges: int) -> None:
    """vocab.json and merges.txt of a CLIP BPE cut to its first ``merges`` merges (open_clip ships the full one)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:merges + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(line.split()) for line in lines]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(dict.fromkeys(vocab))}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")


def hf_clip_folder(path: Path, projection_dim: int = 24, width: int = 40, image_size: int = 32,
                   merges: int = 2000, seed: int = 3) -> Path:
    """PLIP's layout: ``CLIPModel`` + ``CLIPTokenizer`` + ``CLIPImageProcessor`` in one folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _clip_bpe(path, merges)
    tokenizer = CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size, image_mean=list(CLIP_MEAN),
                       image_std=list(CLIP_STD)).save_pretrained(path)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": width, "intermediate_size": 2 * width,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": 8},
        projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(path)
    return path


def m3bind_ecg_folder(path: Path, text_source: str, dim: int = 64, seed: int = 4) -> Path:
    """An ECG CLIP in M3Bind's own format: a small 1-D ResNet ECG tower and the HF text model ``text_source``."""
    from m3bind import EcgTowerConfig, M3BindModel, ModelConfig, TextTowerConfig

    torch.manual_seed(seed)
    config = ModelConfig(name="tiny-ecg-clip", dim=dim, text=TextTowerConfig(source=text_source, pooling="cls",
                                                                             max_length=64),
                         towers={"ecg": EcgTowerConfig(widths=(8, 16))}, modality_towers={"ecg": "ecg"})
    return M3BindModel(config).save_pretrained(path)


def tiny_published_hub(cache: Path, work: Path) -> dict[str, str]:
    """Three tiny published teachers and a BERT in a hub cache, and an ECG CLIP in M3Bind's format (a folder):
    names as a config gives them. Widths (64, 48, 24) and tokenizers (WordPiece at context 256, open_clip BPE
    at 32, CLIP BPE) all differ."""
    work, cache = Path(work), Path(cache)
    hub_cache_repo(cache, "tiny-org/tiny-bert", bert_folder(work / "tiny-bert"))
    with offline_hub(cache):  # the open_clip config names its text model by hub id, as BiomedCLIP's does
        biomed = open_clip_bert_folder(work / "tiny-biomedclip", "tiny-org/tiny-bert")
        m3bind_ecg_folder(work / "tiny-ecg-clip", "tiny-org/tiny-bert")
    hub_cache_repo(cache, "tiny-org/tiny-biomedclip", biomed)
    quilt = open_clip_bpe_folder(work / "tiny-quiltnet")
    hub_cache_repo(cache, "tiny-org/tiny-plip", hf_clip_folder(work / "tiny-plip"))
    return {"bert": "tiny-org/tiny-bert", "open_clip_bert": "hf-hub:tiny-org/tiny-biomedclip",
            "open_clip_bert_dir": str(biomed), "open_clip_bpe": f"local-dir:{quilt}",
            "hf_clip": "tiny-org/tiny-plip", "m3bind_ecg": str(work / "tiny-ecg-clip")}


def main(argv: list[str] | None = None) -> None:
    """``python -m train.published.fixtures DIR``: the tiny teachers of ``train/configs/published_tiny.yaml``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("directory", type=Path)
    root = parser.parse_args(argv).directory.resolve()
    tiny_published_hub(root / "hub", root / "work")
    print(f"export HF_HUB_CACHE={root / 'hub'} HF_HUB_OFFLINE=1 M3BIND_TINY_PUBLISHED={root}")


if __name__ == "__main__":
    main()
