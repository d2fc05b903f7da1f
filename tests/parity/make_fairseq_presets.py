"""Makes tests/parity/data/presets.json: the model settings fairseq-train resolves for every transformer_lm --arch.

    ~/fairseq-venv/bin/python tests/parity/make_fairseq_presets.py

For each architecture registered for ``transformer_lm`` (the named presets and their aliases), fairseq-train's own
parser and arch function run on ``--arch ARCH`` alone (``options.parse_args_and_arch``, then
``convert_namespace_to_omegaconf``, as ``fairseq_cli/train.py``): the resolved ``cfg.model`` is recorded, so the tests
check that ``adaptive_lm.core.config.make_config`` fills, derives and forces every field the same way, without fairseq.
"""

import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.INFO)

from fairseq import options  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.models import ARCH_MODEL_NAME_REGISTRY  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

out = Path(__file__).parent / "data" / "presets.json"
data = tempfile.mkdtemp()
Path(data, "dict.txt").write_text("".join(f"w{i} {100 - i}\n" for i in range(92)))
archs = sorted(a for a, m in ARCH_MODEL_NAME_REGISTRY.items() if m == "transformer_lm")
result = {}
for arch in archs:
    argv = [data, "--task", "language_modeling", "--arch", arch, "--tokens-per-sample", "64", "--cpu"]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    model = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    result[arch] = {k: v for k, v in sorted(model.items()) if isinstance(v, (int, float, str, bool, type(None)))}
out.write_text(json.dumps({"fairseq_version": __import__("fairseq").__version__, "presets": result}, indent=1) + "\n")
print(f"{len(result)} architectures -> {out}", file=sys.stderr)
