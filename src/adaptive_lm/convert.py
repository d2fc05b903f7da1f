"""``adaptive-lm convert``: any supported model -> our folder (``config.json``, ``model.safetensors`` with tied
tensors stored once, ``dict.txt``), or back to a fairseq ``model.pt`` (``--to fairseq``) that fairseq's own
loader accepts: fairseq's key names (tied tensors under every name, split q/k/v, untied tail projections in
fairseq's orientation, ``version`` buffers) and a ``cfg`` of plain dicts (``fairseq/checkpoint_utils.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import FORMAT, unique_state_dict
from .config import ModelConfig
from .hub import LanguageModel, from_pretrained


def export_folder(lm: LanguageModel, dst: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in unique_state_dict(lm.model).items()}
    tmp = out / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, out / "model.safetensors")
    meta = {"format": FORMAT, "model": lm.cfg.to_dict(), "tokens_per_sample": lm.tokens_per_sample}
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    lm.dictionary.save(out / "dict.txt")
    return out


def to_fairseq_state_dict(lm: LanguageModel) -> dict[str, torch.Tensor]:
    """Our weights under fairseq's ``decoder.*`` names, tied tensors shared between their names."""
    cfg = lm.cfg
    own = lm.model.state_dict()
    out: dict[str, torch.Tensor] = {"decoder.version": torch.tensor([3.0])}
    tied_proj = cfg.tie_adaptive_weights and cfg.tie_adaptive_proj
    d = cfg.decoder_embed_dim
    for k, v in own.items():
        v = v.detach().cpu()
        if k.startswith("embed_tokens.embeddings."):
            i = k.split(".")[2]
            out[f"decoder.embed_tokens.embeddings.{i}.0.weight"] = v
        elif k.startswith("embed_tokens.projections."):
            i = k.split(".")[2]
            out[f"decoder.embed_tokens.embeddings.{i}.1.weight"] = v
        elif ".self_attn.qkv." in k:
            kind = k.rsplit(".", 1)[1]
            prefix = k.split(".self_attn.")[0]
            q, kk, vv = v.split(d, dim=0)
            for n, t in zip("qkv", (q, kk, vv)):
                out[f"decoder.{prefix}.self_attn.{n}_proj.{kind}"] = t.clone()
        elif k == "adaptive_softmax.word_weight":
            if cfg.tie_adaptive_weights:
                out["decoder.adaptive_softmax.head.word_proj.weight"] = v
            else:
                out["decoder.adaptive_softmax.head.weight"] = torch.cat([v, own["adaptive_softmax.class_weight"]])
        elif k == "adaptive_softmax.class_weight":
            if cfg.tie_adaptive_weights:
                out["decoder.adaptive_softmax.head.class_proj.weight"] = v
        elif k == "adaptive_softmax.head_in_proj.weight":
            out["decoder.adaptive_softmax.head.word_proj.0.weight"] = v
        elif k.startswith("adaptive_softmax.tail_proj."):
            out[f"decoder.adaptive_softmax.tail.{k.split('.')[-1]}.0.weight"] = v if tied_proj else v.t().contiguous()
        elif k.startswith("adaptive_softmax.tail_out."):
            out[f"decoder.adaptive_softmax.tail.{k.split('.')[-1]}.2.weight"] = v
        elif k.startswith("embed_tokens.highway."):  # fairseq's Highway keeps its layers in .layers
            out["decoder.embed_tokens.highway.layers." + k[len("embed_tokens.highway.") :]] = v
        else:
            out[f"decoder.{k}"] = v
    if "decoder.adaptive_softmax.head.word_proj.0.weight" in out:  # word_proj became a Sequential
        out["decoder.adaptive_softmax.head.word_proj.1.weight"] = out.pop(
            "decoder.adaptive_softmax.head.word_proj.weight"
        )
    if cfg.adaptive_input:
        out["decoder.embed_tokens._float_tensor"] = torch.zeros(1)
    if cfg.adaptive_softmax_cutoff is not None:
        out["decoder.adaptive_softmax.version"] = torch.tensor([1])
        out["decoder.adaptive_softmax.head._float_tensor"] = torch.zeros(1)
    return out


def fairseq_model_cfg(cfg: ModelConfig, tokens_per_sample: int) -> dict[str, Any]:
    """Every field of fairseq's TransformerLanguageModelConfig, as built: ``_name`` is the plain ``transformer_lm``
    (fairseq then honours every stored value, decoder_normalize_before included), a pruned model is stored with
    its layer count and no ``decoder_layers_to_keep`` (fairseq would prune it again)."""
    m: dict[str, Any] = {k: v for k, v in cfg.to_dict().items() if k not in ("vocab_size", "padding_idx")}
    for k in ("adaptive_input_cutoff", "adaptive_softmax_cutoff"):
        m[k] = ",".join(map(str, m[k])) if m[k] is not None else None
    m.update(_name="transformer_lm", tokens_per_sample=tokens_per_sample, decoder_layers=cfg.num_layers,
             decoder_layers_to_keep=None)  # fmt: skip
    return m


# fairseq 0.12's GenerationConfig defaults (fairseq/dataclass/configs.py), as fairseq-train writes them
FAIRSEQ_GENERATION: dict[str, Any] = {
    "_name": None, "beam": 5, "beam_mt": 0, "nbest": 1, "max_len_a": 0.0, "max_len_b": 200, "max_len_a_mt": 0.0,
    "max_len_b_mt": 200, "min_len": 1, "match_source_len": False, "unnormalized": False, "no_early_stop": False,
    "no_beamable_mm": False, "lenpen": 1.0, "lenpen_mt": 1.0, "unkpen": 0.0, "replace_unk": None, "sacrebleu": False,
    "score_reference": False, "prefix_size": 0, "no_repeat_ngram_size": 0, "sampling": False, "sampling_topk": -1,
    "sampling_topp": -1.0, "constraints": None, "temperature": 1.0, "diverse_beam_groups": -1,
    "diverse_beam_strength": 0.5, "diversity_rate": -1.0, "print_alignment": None, "print_step": False,
    "lm_path": None, "lm_weight": 0.0, "iter_decode_eos_penalty": 0.0, "iter_decode_max_iter": 10,
    "iter_decode_force_max_iter": False, "iter_decode_with_beam": 1, "iter_decode_with_external_reranker": False,
    "retain_iter_history": False, "retain_dropout": False, "retain_dropout_modules": None, "decoding_format": None,
    "no_seed_provided": False, "eos_token": None,
}  # fmt: skip


# fairseq 0.12's DatasetConfig defaults: its hub's batching reads them
FAIRSEQ_DATASET: dict[str, Any] = {
    "_name": None, "num_workers": 1, "skip_invalid_size_inputs_valid_test": False, "max_tokens": None,
    "batch_size": None, "required_batch_size_multiple": 8, "required_seq_len_multiple": 1, "dataset_impl": None,
    "data_buffer_size": 10, "train_subset": "train", "valid_subset": "valid", "combine_valid_subsets": None,
    "ignore_unused_valid_subsets": False, "validate_interval": 1, "validate_interval_updates": 0,
    "validate_after_updates": 0, "fixed_validation_seed": None, "disable_validation": False, "max_tokens_valid": None,
    "batch_size_valid": None, "max_valid_steps": None, "curriculum": 0, "gen_subset": "test", "num_shards": 1,
    "shard_id": 0, "grouped_shuffling": False, "update_epoch_batch_itr": False, "update_ordered_indices_seed": False,
}  # fmt: skip


def to_fairseq_checkpoint(lm: LanguageModel) -> dict[str, Any]:
    tps = lm.tokens_per_sample or lm.cfg.max_target_positions
    task = {
        "_name": "language_modeling",
        "data": ".",
        "sample_break_mode": "none",
        "tokens_per_sample": tps,
        "output_dictionary_size": -1,
        "self_target": False,
        "future_target": False,
        "past_target": False,
        "add_bos_token": lm.cfg.add_bos_token,
        "max_target_positions": None,
        "shorten_method": "none",
        "shorten_data_split_list": "",
        "seed": 1,
    }
    cfg = {
        "_name": None,
        "common": {"_name": None, "seed": 1, "cpu": False, "tpu": False, "bf16": False, "fp16": False,
                   "memory_efficient_fp16": False, "memory_efficient_bf16": False, "user_dir": None,
                   "model_parallel_size": 1},
        "dataset": dict(FAIRSEQ_DATASET),
        "common_eval": {"_name": None, "path": None, "post_process": None, "quiet": False, "model_overrides": "{}",
                        "results_path": None},
        "task": task,
        "model": fairseq_model_cfg(lm.cfg, tps),
        "criterion": {"_name": "adaptive_loss", "sentence_avg": False},
        "generation": dict(FAIRSEQ_GENERATION),  # fairseq's hub (score, sample) copies and reads it
        "bpe": None,
        "tokenizer": None,
    }  # fmt: skip
    return {
        "args": None,
        "cfg": cfg,
        "model": to_fairseq_state_dict(lm),
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "AdaptiveLoss",
                "optimizer_name": "FairseqNAG",
                "lr_scheduler_state": {"best": None},
                "num_updates": 0,
            }
        ],
        "task_state": {},
        "extra_state": {"train_iterator": {"epoch": 1}, "val_loss": None},
        "last_optimizer_state": None,
    }


def convert(src: str, dst: str, to: str = "folder", dictionary: str | None = None) -> Path:
    lm = from_pretrained(src, dictionary=dictionary)
    if to == "folder":
        return export_folder(lm, dst)
    out = Path(dst)
    if out.suffix != ".pt":
        out.mkdir(parents=True, exist_ok=True)
        lm.dictionary.save(out / "dict.txt")
        out = out / "model.pt"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        lm.dictionary.save(out.parent / "dict.txt")
    tmp = out.with_name(out.name + ".tmp")
    torch.save(to_fairseq_checkpoint(lm), tmp)
    os.replace(tmp, out)
    return out
