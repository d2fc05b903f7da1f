"""Writing our model as a fairseq checkpoint: fairseq's key names and a ``cfg`` of plain dicts with fairseq 0.12's
defaults, which fairseq's own loader and hub accept."""

from __future__ import annotations

from typing import Any

import torch

from adaptive_lm.core.config import ModelConfig
from adaptive_lm.core.fairseq_format.keys import state_dict_to_fairseq


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


def to_fairseq_checkpoint(model: torch.nn.Module, cfg: ModelConfig, tokens_per_sample: int | None) -> dict[str, Any]:
    """A checkpoint fairseq's own loader and hub accept: fairseq's key names and a ``cfg`` of plain dicts."""
    tps = tokens_per_sample or cfg.max_target_positions
    task = {
        "_name": "language_modeling",
        "data": ".",
        "sample_break_mode": "none",
        "tokens_per_sample": tps,
        "output_dictionary_size": -1,
        "self_target": False,
        "future_target": False,
        "past_target": False,
        "add_bos_token": cfg.add_bos_token,
        "max_target_positions": None,
        "shorten_method": "none",
        "shorten_data_split_list": "",
        "seed": 1,
    }
    fs_cfg = {
        "_name": None,
        "common": {"_name": None, "seed": 1, "cpu": False, "tpu": False, "bf16": False, "fp16": False,
                   "memory_efficient_fp16": False, "memory_efficient_bf16": False, "user_dir": None,
                   "model_parallel_size": 1},
        "dataset": dict(FAIRSEQ_DATASET),
        "common_eval": {"_name": None, "path": None, "post_process": None, "quiet": False, "model_overrides": "{}",
                        "results_path": None},
        "task": task,
        "model": fairseq_model_cfg(cfg, tps),
        "criterion": {"_name": "adaptive_loss", "sentence_avg": False},
        "generation": dict(FAIRSEQ_GENERATION),  # fairseq's hub (score, sample) copies and reads it
        "bpe": None,
        "tokenizer": None,
    }  # fmt: skip
    return {
        "args": None,
        "cfg": fs_cfg,
        "model": state_dict_to_fairseq(model, cfg),
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
