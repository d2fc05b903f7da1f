"""Reference generations, scores and sampling distributions from real fairseq (issue 22).

Run from anywhere with the side venv (fairseq-fixed 0.12.3.1, torch 2.13.0 CPU, tokenizers, sentencepiece):
    ~/fairseq-venv/bin/python tests/generation/make_fairseq_generation.py
It loads every model of tests/generation/models/ through fairseq's hub (TransformerLanguageModel.from_pretrained ->
GeneratorHubInterface), CPU, fp32, one thread, and writes tests/generation/data/reference.json and
tests/generation/data/sampling.pt (tensors: the sampling distributions). Prompts are sentence starts of WikiText-2's
valid.txt (the models were trained on test.txt), read from ../shared/data/wikitext-2/. See README.md and SPEC.md.

Beam cases are chosen to be robust across CPUs: every decision of the search (the order of the top 2*beam+1 candidate
scores of each sentence at every step, and the order of the returned hypotheses' scores) is separated by more than
GAP; a case whose first prompt set is closer than that takes the next prompt set of its pool.
"""

import json
import math
import os
import sys

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
import logging  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import fairseq  # noqa: E402
from fairseq import search  # noqa: E402
from fairseq.models.transformer_lm import TransformerLanguageModel  # noqa: E402
from fairseq.ngram_repeat_block import NGramRepeatBlock  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")
OUT = os.path.join(HERE, "data")
VALID = os.path.join(HERE, "..", "..", "..", "shared", "data", "wikitext-2", "valid.txt")
GAP = 1e-4

# from_pretrained keyword arguments per model (paths relative to the model folder; sentencepiece.bpe.model is found
# by from_pretrained itself)
LOAD = {
    "wiki_tied": {},
    "postln": {},
    "untied": {},
    "bos": {},
    "gpt2bpe": {"bpe": "gpt2", "gpt2_encoder_json": "encoder.json", "gpt2_vocab_bpe": "vocab.bpe"},
    "spm": {"bpe": "sentencepiece"},
}
WORD_MODELS = ["wiki_tied", "postln", "untied", "bos"]
BPE_MODELS = ["gpt2bpe", "spm"]
RAW_PROMPTS = [  # raw text for the BPE models: contractions, digits, punctuation without WikiText's spacing
    "The game's music was composed by",
    "In 1998, the band released",
    "She was born in London and",
    "It is one of the largest",
    "The river flows through the",
    "He didn't return to the",
    "After the war, the",
    "The album received",
]


# ----------------------------------------------------------------------------------------------------------------
# prompts


def sentence_starts():
    """First words of WikiText-2 valid.txt sentences (paragraph lines split at ' . '), in file order."""
    with open(VALID, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    sents = []
    for line in lines:
        if line and not line.startswith("="):
            sents += [s.split() for s in line.split(" . ") if len(s.split()) >= 12]
    return sents


class Pools:
    """Deterministic candidate prompt lists of a given kind, for one model's vocabulary."""

    def __init__(self, hub, raw):
        self.sents = sentence_starts()
        self.unk = hub.src_dict.unk()
        self.hub = hub
        self.raw = raw

    def _known(self, words):
        return "<unk>" not in words and all(self.hub.src_dict.index(w) != self.unk for w in words)

    def plain(self, n, start=0):
        """Sentence starts of n words, all in the dictionary (word models) / without '<unk>'."""
        out = []
        for i, s in enumerate(self.sents):
            if i >= start and (self._known(s[:n]) if not self.raw else "<unk>" not in s[:n]):
                out.append(" ".join(s[:n]))
        return out

    def with_unk(self, n):
        """Sentence starts of n words with an out-of-dictionary word (encoded as <unk>) before the last word."""
        return [" ".join(s[:n]) for s in self.sents if not self._known(s[: n - 1]) and self._known(s[n - 1 : n])]

    def get(self, kind):
        """List of prompt lists."""
        if kind.startswith("raw"):  # raw text first, then sentence starts
            n = int(kind[3:] or 1)
            pool = RAW_PROMPTS + self.plain(6, 100)
            return [pool[i : i + n] for i in range(0, len(pool) - n, n)]
        if kind.startswith("words"):  # words<n>: one prompt of n words
            return [[p] for p in self.plain(int(kind[5:]))]
        if kind == "unk":
            return [[p] for p in self.with_unk(5)]
        if kind == "batch3":  # three prompts of different lengths in one batch
            a, b, c = self.plain(2, 50), self.plain(5, 150), self.plain(9, 250)
            return [[a[i], b[i], c[i]] for i in range(min(len(a), len(b), len(c)))]
        if kind == "empty":  # the empty prompt and a one-word prompt together
            return [["", p] for p in self.plain(1, 30)]
        if kind == "batch4":
            a, b = self.plain(3, 60), self.plain(7, 160)
            return [[a[2 * i], b[i], a[2 * i + 1], b[i + 40]] for i in range(30)]
        raise ValueError(kind)


# ----------------------------------------------------------------------------------------------------------------
# instrumentation


class Recorder:
    """Wraps fairseq's search steps and the hub's inference_step to record batches, gaps and random draws."""

    def __init__(self):
        self.reset()
        self.orig_beam_step = search.BeamSearch.step
        self.orig_sampling_step = search.Sampling.step
        self.orig_multinomial = torch.multinomial
        self.orig_ngram = NGramRepeatBlock._no_repeat_ngram
        rec = self

        def beam_step(self_, step, lprobs, scores, *a, **k):
            rec.beam_gap(step, lprobs, scores)
            return rec.orig_beam_step(self_, step, lprobs, scores, *a, **k)

        def sampling_step(self_, step, lprobs, scores, *a, **k):
            if rec.capture_steps and step < rec.capture_steps:
                rec.sampling_inputs.append((step, lprobs.clone(), None if scores is None else scores.clone()))
            out = rec.orig_sampling_step(self_, step, lprobs, scores, *a, **k)
            if rec.capture_steps and step < rec.capture_steps:
                rec.sampling_outputs.append(tuple(t.clone() for t in out))
            return out

        def multinomial(probs, num_samples, replacement=False, **k):
            out = rec.orig_multinomial(probs, num_samples, replacement=replacement, **k)
            rec.draws.append((probs.clone(), num_samples, replacement, out.clone()))
            return out

        search.BeamSearch.step = beam_step
        search.Sampling.step = sampling_step
        torch.multinomial = multinomial

    def reset(self):
        self.gap = math.inf
        self.draws = []
        self.batches = []
        self.capture_steps = 0
        self.sampling_inputs = []
        self.sampling_outputs = []

    def beam_gap(self, step, lprobs, scores):
        """Smallest difference between adjacent values among each sentence's top 2*beam+1 finite candidates."""
        bsz, beam, vocab = lprobs.size()
        cand = lprobs[:, ::beam, :] if step == 0 else lprobs + scores[:, :, step - 1].unsqueeze(-1)
        flat = cand.reshape(bsz, -1)
        top = flat.topk(min(2 * beam + 1, flat.size(1))).values
        for row in top:
            row = row[torch.isfinite(row)].double()
            if row.numel() > 1:
                self.gap = min(self.gap, float((row[:-1] - row[1:]).min()))

    def wrap_hub(self, hub):
        """Record each batch fairseq's hub builds: ids, src_tokens width and the max_len it implies."""
        task = hub.task
        orig = type(task).inference_step
        rec = self

        def inference_step(generator, models, sample, **k):
            src = sample["net_input"]["src_tokens"]
            max_len = None
            if hasattr(generator, "max_len_a"):  # a SequenceGenerator (score() uses a SequenceScorer)
                max_len = min(int(generator.max_len_a * src.size(1) + generator.max_len_b), generator.max_len - 1)
            rec.batches.append(
                {"ids": sample["id"].tolist(), "src_tokens": src.tolist(), "src_len": src.size(1), "max_len": max_len}
            )
            return orig(task, generator, models, sample, **k)

        task.inference_step = inference_step


def fixed_no_repeat_ngram(self, tokens, lprobs, bsz, beam_size, step):
    """What fairseq's CUDA kernel (and fairseq before commit 8ca4813) does: ban the token that would repeat an
    n-gram ending at the current position. fairseq 0.12's CPU path compares with the last n-1 columns of the whole
    padded buffer instead (always pads), so it never bans anything (fairseq issue 5206)."""
    n = self.no_repeat_ngram_size
    banned = [[] for _ in range(bsz * beam_size)]
    if step + 2 - n >= 0:
        rows = tokens.cpu().tolist()
        start = step + 2 - n
        for b in range(bsz * beam_size):
            tail = rows[b][start : step + 1]
            for i in range(start):
                if rows[b][i : i + n - 1] == tail:
                    banned[b].append(rows[b][i + n - 1])
    for b in range(bsz * beam_size):
        lprobs[b][torch.tensor(banned[b], dtype=torch.int64)] = -math.inf
    return lprobs


# ----------------------------------------------------------------------------------------------------------------
# helpers


def load(name, **overrides):
    kwargs = {k: (os.path.join(MODELS, name, v) if k.startswith("gpt2_") else v) for k, v in LOAD[name].items()}
    hub = TransformerLanguageModel.from_pretrained(os.path.join(MODELS, name), "model.pt", **kwargs, **overrides)
    return hub.eval()


def floats(t):
    return [float(x) for x in t.float().tolist()]


def hypo_json(hub, h):
    return {
        "tokens": h["tokens"].tolist(),
        "score": float(h["score"]),
        "positional_scores": floats(h["positional_scores"]),
        "text": hub.decode(h["tokens"]),
    }


def final_gap(outputs):
    gap = math.inf
    for hypos in outputs:
        s = sorted((float(h["score"]) for h in hypos), reverse=True)
        gap = min([gap] + [a - b for a, b in zip(s, s[1:])])
    return gap


# ----------------------------------------------------------------------------------------------------------------
# cases

# (kind of prompt list, generate kwargs, options); beam is always given explicitly
BEAM_SETTINGS = [
    ("words4", dict(beam=5, max_len_b=30), {}),
    ("words6", dict(beam=1, max_len_b=25), {}),
    ("words3", dict(beam=3, lenpen=0.5, max_len_b=25), {}),
    ("words5", dict(beam=8, lenpen=2.0, max_len_b=25), {}),
    ("unk", dict(beam=5, unkpen=5.0, max_len_b=20), {}),
    ("words4", dict(beam=5, unkpen=-12.0, max_len_b=20), {}),
    ("words3", dict(beam=4, min_len=18, max_len_b=24), {}),
    ("words2", dict(beam=4, max_len_a=1.5, max_len_b=2), {}),
    ("words8", dict(beam=5, max_len_b=5), {}),
    ("words4", dict(beam=5, no_repeat_ngram_size=2, max_len_b=30), {}),
    ("words4", dict(beam=5, no_repeat_ngram_size=2, max_len_b=30), {"ngram": "fixed"}),
    ("words5", dict(beam=4, no_repeat_ngram_size=3, max_len_b=30), {"ngram": "fixed"}),
    ("words4", dict(beam=5, nbest=2, max_len_b=20), {}),
    ("batch3", dict(beam=5, min_len=12, max_len_b=20), {}),
    ("empty", dict(beam=3, max_len_b=15), {}),
    ("words4", dict(beam=5, temperature=0.7, max_len_b=20), {}),
    ("words4", dict(beam=5, temperature=1.3, max_len_b=20), {}),
    ("batch4", dict(beam=2, max_len_b=15), {"load": {"batch_size": 2}}),
    ("words3", dict(beam=2), {}),  # the defaults: max_len_b 200, capped by the model's max positions - 1
    ("words4", dict(beam=5, unnormalized=True, max_len_b=20), {}),  # sums of ln p: shorter hypotheses win
    ("batch3", dict(beam=4, unnormalized=True, lenpen=2.0, min_len=6, max_len_b=20), {}),  # lenpen then unused
]
BPE_SETTINGS = [
    ("raw1", dict(beam=5, max_len_b=30), {}),
    ("raw1", dict(beam=1, max_len_b=30), {}),
    ("raw1", dict(beam=8, lenpen=2.0, max_len_b=25), {}),
    ("raw1", dict(beam=3, lenpen=0.5, min_len=20, max_len_b=30), {}),
    ("raw3", dict(beam=4, max_len_b=20), {}),
    ("raw1", dict(beam=5, max_len_a=1.2, max_len_b=3), {}),
    ("raw1", dict(beam=4, no_repeat_ngram_size=3, max_len_b=30), {"ngram": "fixed"}),
    ("raw1", dict(beam=5, temperature=0.7, max_len_b=20), {}),
    ("empty", dict(beam=3, max_len_b=15), {}),
    ("raw1", dict(beam=2), {}),
]


def run_beam_case(rec, hubs, name, pools, kind, kwargs, opts, tries=40):
    hub = hubs[(name, json.dumps(opts.get("load", {})))]
    best = None
    for prompts in pools.get(kind)[:tries]:
        if opts.get("ngram") == "fixed":
            NGramRepeatBlock._no_repeat_ngram = fixed_no_repeat_ngram
        rec.reset()
        try:
            tokens = [hub.encode(p) for p in prompts]
            outputs = hub.generate(tokens, **kwargs)
        finally:
            NGramRepeatBlock._no_repeat_ngram = rec.orig_ngram
        gap = min(rec.gap, final_gap(outputs))
        case = {
            "model": name,
            "load_overrides": opts.get("load", {}),
            "ngram_impl": opts.get("ngram", "fairseq_cpu") if kwargs.get("no_repeat_ngram_size") else None,
            "prompts": prompts,
            "prompt_ids": [t.tolist() for t in tokens],
            "generate_kwargs": kwargs,
            "batches": [{k: b[k] for k in ("ids", "src_len", "max_len", "src_tokens")} for b in rec.batches],
            "min_gap": gap,
            "hypos": [[hypo_json(hub, h) for h in hypos] for hypos in outputs],
        }
        if best is None or gap > best["min_gap"]:
            best = case
        if gap > GAP:
            return case
    print(f"  WARNING {name} {kind} {kwargs}: no prompt set with gap > {GAP}, best {best['min_gap']:.2e}")
    return best


# prompts given as ids, as a caller of generate may pass them (fairseq's hub batches and checks their own lengths,
# </s> markers included): without </s>, with several, repeating an n-gram after the length limit cuts them, as long
# as the model's positions ("full": max_positions ids without </s>)
ID_SETTINGS = [
    ([[15, 42, 7, 4, 16], [35, 4]], dict(beam=2, max_len_a=1.0, max_len_b=2), {"load": {"max_tokens": 10}}),
    ([[2, 15, 42, 7, 4, 16, 2, 2], [35, 4, 2]], dict(beam=2, max_len_a=1.0, max_len_b=2), {"load": {"max_tokens": 10}}),
    ([[15, 42, 7, 4, 15, 42, 2]], dict(beam=3, max_len_b=4, no_repeat_ngram_size=2), {"ngram": "fixed"}),
    ("full", dict(beam=2, max_len_b=10), {}),
]


def id_cases(rec, hubs, first):
    cases = []
    for name in WORD_MODELS:
        for prompts, kwargs, opts in ID_SETTINGS:
            hub = hubs[(name, json.dumps(opts.get("load", {})))]
            if prompts == "full":
                prompts = [list(range(10, 10 + hub.max_positions))]
            if opts.get("ngram") == "fixed":
                NGramRepeatBlock._no_repeat_ngram = fixed_no_repeat_ngram
            rec.reset()
            try:
                outputs = hub.generate([torch.tensor(p) for p in prompts], **kwargs)
            finally:
                NGramRepeatBlock._no_repeat_ngram = rec.orig_ngram
            case = {
                "id": f"b{first + len(cases):03d}",
                "model": name,
                "load_overrides": opts.get("load", {}),
                "ngram_impl": opts.get("ngram", "fairseq_cpu") if kwargs.get("no_repeat_ngram_size") else None,
                "prompts": None,
                "prompt_ids": prompts,
                "generate_kwargs": kwargs,
                "batches": [{k: b[k] for k in ("ids", "src_len", "max_len", "src_tokens")} for b in rec.batches],
                "min_gap": min(rec.gap, final_gap(outputs)),
                "hypos": [[hypo_json(hub, h) for h in hypos] for hypos in outputs],
            }
            cases.append(case)
            print(f"{case['id']} {name:9s} ids {json.dumps(kwargs):56s} gap {case['min_gap']:.2e}")
    return cases


def beam_cases(rec, hubs, pools):
    cases = []
    for name in WORD_MODELS + BPE_MODELS:
        settings = BEAM_SETTINGS if name in WORD_MODELS else BPE_SETTINGS
        for kind, kwargs, opts in settings:
            case = run_beam_case(rec, hubs, name, pools[name], kind, kwargs, opts)
            case["id"] = f"b{len(cases):03d}"
            cases.append(case)
            print(f"{case['id']} {name:9s} {json.dumps(kwargs):60s} gap {case['min_gap']:.2e}")
    return cases


SCORE_SENTENCES_RAW = [
    "The game's music was composed by a team of three.",
    "In 1998, the band released their second album.",
    "It is one of the largest cities in the region.",
]


def score_cases(hubs, pools):
    cases = []
    for name in WORD_MODELS + BPE_MODELS:
        hub = hubs[(name, "{}")]
        if name in WORD_MODELS:
            sents = [" ".join(pools[name].sents[i][:12]) for i in (3, 40, 77)]  # may contain <unk>
        else:
            sents = SCORE_SENTENCES_RAW
        # one sentence at a time, then all together (one batch), then two lines joined with replace_newline_with_eos,
        # then with newlines at the ends and a blank line between (fairseq strips the </s> at either end)
        for mode, arg, kw in [
            ("single", sents[0], {}),
            ("batch", sents, {}),
            ("newline_eos", sents[1] + "\n" + sents[2], {"replace_newline_with_eos": True}),
            ("newline_ends", "\n" + sents[1] + "\n\n" + sents[2] + "\r\n", {"replace_newline_with_eos": True}),
        ]:
            out = hub.score(arg, **kw)
            out = out if isinstance(out, list) else [out]
            cases.append(
                {
                    "model": name,
                    "mode": mode,
                    "sentences": arg if isinstance(arg, list) else [arg],
                    "score_kwargs": kw,
                    "results": [
                        {
                            "tokens": h["tokens"].tolist(),
                            "score": float(h["score"]),
                            "positional_scores": floats(h["positional_scores"]),
                        }
                        for h in out
                    ],
                }
            )
    return cases


SAMPLING_FILTERS = [  # (model, generate kwargs)
    ("wiki_tied", dict(sampling=True, sampling_topk=10)),
    ("postln", dict(sampling=True, sampling_topp=0.8)),
    ("spm", dict(sampling=True, sampling_topp=0.95)),
    ("untied", dict(sampling=True, temperature=0.7)),
    ("gpt2bpe", dict(sampling=True, temperature=1.3)),
    ("bos", dict(sampling=True)),
    ("wiki_tied", dict(sampling=True, sampling_topk=5, temperature=0.7)),
    ("spm", dict(sampling=True, sampling_topp=0.9, temperature=1.3)),
]


def sampling_filter_cases(rec, hubs, tensors):
    """The distributions search.Sampling.step hands to torch.multinomial at steps 0 and 1 of a real generation."""
    cases = []
    for i, (name, kwargs) in enumerate(SAMPLING_FILTERS):
        hub = hubs[(name, "{}")]
        prompts = ["", "The"]  # step 0: free for "", forced (one-hot) for "The"; step 1: both free
        rec.reset()
        rec.capture_steps = 2
        torch.manual_seed(100 + i)
        hub.generate([hub.encode(p) for p in prompts], beam=2, max_len_b=6, **kwargs)
        steps = []
        for (step, lprobs, scores), out, draw in zip(rec.sampling_inputs, rec.sampling_outputs, rec.draws):
            key = f"f{i}_s{step}"
            probs, n, repl, drawn = draw
            tensors[key] = {
                "lprobs": lprobs,  # (bsz, beam, V) as passed to Sampling.step (after pad/unk/eos masking)
                "scores": scores,  # (bsz, beam, step) cumulative scores so far
                "probs": probs,  # what torch.multinomial received (rows: bsz at step 0, bsz*beam after)
                "drawn": drawn,  # torch.multinomial's result
                "cand_scores": out[0],
                "cand_indices": out[1],
                "cand_beams": out[2],
            }
            margin = topp_margin(lprobs if step else lprobs[:, ::2], kwargs.get("sampling_topp", -1))
            steps.append({"step": step, "key": key, "num_samples": n, "replacement": repl, "topp_margin": margin})
        cases.append(
            {"model": name, "prompts": prompts, "beam": 2, "generate_kwargs": kwargs, "seed": 100 + i, "steps": steps}
        )
        print(f"filter {name} {kwargs}: {len(steps)} steps")
    return cases


def topp_margin(lprobs, p):
    """Smallest |cumsum - p| over the sorted probabilities of finite-entropy rows: how far top-p's cut is from
    flipping."""
    if p <= 0:
        return None
    probs = lprobs.float().exp().sort(descending=True).values.cumsum(-1)
    rows = probs.reshape(-1, probs.size(-1))
    margins = [float((r - p).abs().min()) for r in rows if r[0] < 0.999999]  # skip one-hot (forced) rows
    return min(margins) if margins else None


SAMPLING_GENERATE = [  # (model, prompts, beam, generate kwargs)
    ("wiki_tied", ["The"], 1, dict(sampling_topk=10, max_len_b=20)),
    ("postln", ["He was", ""], 1, dict(sampling_topp=0.9, max_len_b=20)),
    ("untied", ["In the"], 3, dict(max_len_b=15)),
    ("bos", ["The song"], 2, dict(sampling_topk=20, temperature=0.8, max_len_b=15)),
    ("gpt2bpe", ["The game's music"], 1, dict(sampling_topp=0.95, max_len_b=25)),
    ("spm", ["After the war,", "It"], 2, dict(sampling_topk=10, temperature=1.2, max_len_b=20)),
]


def sampling_generate_cases(rec, hubs, tensors):
    """Full sampled generations after torch.manual_seed(seed), with the sequence of torch.multinomial calls; each is
    replayed (same seed, same calls on the recorded probabilities) to show the draws depend on nothing else."""
    cases = []
    for i, (name, prompts, beam, kw) in enumerate(SAMPLING_GENERATE):
        hub = hubs[(name, "{}")]
        for seed in (1, 2, 3):
            rec.reset()
            torch.manual_seed(seed)
            outputs = hub.generate([hub.encode(p) for p in prompts], beam=beam, sampling=True, **kw)
            torch.manual_seed(seed)
            # the hub's DataLoader iterator draws its base seed first (torch/utils/data/dataloader.py
            # _BaseDataLoaderIter.__init__), once per generate call; then only the search's multinomial calls
            torch.empty((), dtype=torch.int64).random_()
            replay = all(torch.equal(rec.orig_multinomial(p, n, replacement=r), d) for p, n, r, d in rec.draws)
            torch.manual_seed(seed)
            texts = hub.sample(prompts, beam=beam, sampling=True, **kw)
            key = f"g{i}_seed{seed}"
            tensors[key] = {"drawn": [d[3] for d in rec.draws]}  # (the probabilities would be 3 MB)
            cases.append(
                {
                    "model": name,
                    "prompts": prompts,
                    "prompt_ids": [hub.encode(p).tolist() for p in prompts],
                    "seed": seed,
                    "generate_kwargs": dict(beam=beam, sampling=True, **kw),
                    "draws": [{"shape": list(d[0].shape), "num_samples": d[1], "replacement": d[2]} for d in rec.draws],
                    "draws_key": key,
                    "replay_matches": replay,
                    "rng_before_draws": "torch.empty((), dtype=torch.int64).random_()",
                    "hypos": [[hypo_json(hub, h) for h in hypos] for hypos in outputs],
                    "sample_texts": texts,
                }
            )
            print(f"sample {name} seed {seed}: {len(rec.draws)} draws, replay {replay}: {texts[0]!r}")
    return cases


def model_info(hub, name):
    cfg = hub.cfg
    dec = hub.models[0].decoder
    return {
        "dir": f"models/{name}",
        "load_kwargs": LOAD[name],
        "arch": cfg.model.arch if "arch" in cfg.model else cfg.model._name,
        "vocab_size": len(hub.tgt_dict),
        "max_positions": int(hub.max_positions),
        "add_bos_token": bool(cfg.task.add_bos_token),
        "normalize_before": bool(dec.layers[0].normalize_before),
        "adaptive_softmax": dec.adaptive_softmax is not None,
        "max_tokens": cfg.dataset.max_tokens,
        "batch_size": cfg.dataset.batch_size,
        "generation_defaults": {
            k: cfg.generation[k]
            for k in (
                "beam",
                "max_len_a",
                "max_len_b",
                "min_len",
                "lenpen",
                "unkpen",
                "temperature",
                "no_repeat_ngram_size",
                "sampling_topk",
                "sampling_topp",
            )
        },
    }


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    rec = Recorder()
    hubs = {}
    for name in LOAD:
        for opts in [{}, {"batch_size": 2}, {"max_tokens": 10}] if name in WORD_MODELS else [{}]:
            hubs[(name, json.dumps(opts))] = load(name, **opts)
            rec.wrap_hub(hubs[(name, json.dumps(opts))])
    pools = {name: Pools(hubs[(name, "{}")], raw=name in BPE_MODELS) for name in LOAD}
    tensors = {}
    ref = {
        "fairseq_version": fairseq.__version__,
        "torch_version": torch.__version__,
        "gap_threshold": GAP,
        "models": {name: model_info(hubs[(name, "{}")], name) for name in LOAD},
    }
    ref["beam_cases"] = beam_cases(rec, hubs, pools)
    ref["beam_cases"] += id_cases(rec, hubs, len(ref["beam_cases"]))
    ref["min_beam_gap"] = min(c["min_gap"] for c in ref["beam_cases"])
    ref["score_cases"] = score_cases(hubs, pools)
    ref["sampling_filter_cases"] = sampling_filter_cases(rec, hubs, tensors)
    ref["sampling_generate_cases"] = sampling_generate_cases(rec, hubs, tensors)
    if "--add-new" in sys.argv:
        ref, tensors = add_new(ref)
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        f.write(dumps(ref))
    torch.save(tensors, os.path.join(OUT, "sampling.pt"))
    print(
        f"{len(ref['beam_cases'])} beam cases, min gap {ref['min_beam_gap']:.3e}; "
        f"{len(ref['score_cases'])} score cases; {len(ref['sampling_filter_cases'])} filter cases; "
        f"{len(ref['sampling_generate_cases'])} sampled generations"
    )


def add_new(ref):
    """``--add-new``: the committed reference.json and sampling.pt as they are, plus the beam cases of settings they
    lack (new entries in BEAM_SETTINGS / ID_SETTINGS), numbered after the last. Why: fairseq on another CPU rounds
    differently in the last bits (MKL's kernels differ), so a full regeneration rewrites every case's floats."""
    with open(os.path.join(OUT, "reference.json"), encoding="utf-8") as f:
        old = json.load(f)

    def key(c):
        return json.dumps([c["model"], c["load_overrides"], c["ngram_impl"], c["generate_kwargs"]], sort_keys=True)

    known = {key(c) for c in old["beam_cases"]}
    for c in ref["beam_cases"]:
        if key(c) not in known:
            c["id"] = f"b{len(old['beam_cases']):03d}"
            old["beam_cases"].append(c)
            print(f"added {c['id']} {c['model']} {json.dumps(c['generate_kwargs'])}")
    old["min_beam_gap"] = min(c["min_gap"] for c in old["beam_cases"])
    return old, torch.load(os.path.join(OUT, "sampling.pt"))


def dumps(ref):
    """Readable but compact: one line per case, per hypothesis list."""
    parts = []
    for k, v in ref.items():
        if isinstance(v, list):
            items = ",\n  ".join(json.dumps(c, ensure_ascii=False) for c in v)
            parts.append(f"{json.dumps(k)}: [\n  {items}\n ]")
        else:
            parts.append(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


if __name__ == "__main__":
    sys.exit(main())
