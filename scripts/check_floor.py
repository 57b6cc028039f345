"""Check that the shipped tokenizer files load the same on the lowest transformers/tokenizers the project declares.

    python3 scripts/check_floor.py            # used by .ci/run; needs PyPI (about a minute)

Reads the floors of ``transformers`` and ``tokenizers`` from pyproject.toml, installs exactly
``transformers==<floor>`` (and the newest ``tokenizers`` of the declared floor's minor series) into a
temporary virtual environment, and compares what the tokenizer of ``tools/assets/tiny-llada`` produces
there (class loads, chat template ids, encode, decode, special ids) with the installed versions' output.
Exit status 1 on any difference.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "tools" / "assets" / "tiny-llada"

PROBE = r'''
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
chat = tok.apply_chat_template([{"role": "user", "content": "What is 12+7?"}], add_generation_prompt=True,
                               tokenize=True)
chat = chat["input_ids"] if hasattr(chat, "keys") else chat
print(json.dumps({"chat": [int(x) for x in chat], "encode": tok("Sort: 52 71 19")["input_ids"],
                  "decode": tok.decode([20, 21, 22, 5], skip_special_tokens=True),
                  "eos": tok.eos_token_id, "pad": tok.pad_token_id, "mask": tok.convert_tokens_to_ids("<|mdm_mask|>")}))
'''


def declared_floor(name: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(name)}>=([0-9][0-9.]*)', text)
    if match is None:
        sys.exit(f"check_floor: pyproject.toml declares no floor for {name}")
    return match.group(1)


def probe(python: str) -> dict:
    out = subprocess.run([python, "-c", PROBE, str(SHIPPED)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"check_floor: the tokenizer did not load with {python}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    transformers, tokenizers = declared_floor("transformers"), declared_floor("tokenizers")
    major, minor = tokenizers.split(".")[:2]
    pins = [f"transformers=={transformers}", f"tokenizers>={tokenizers},<{major}.{int(minor) + 1}", "jinja2>=3.1"]
    with tempfile.TemporaryDirectory(prefix="dllm-floor-") as tmp:
        venv.create(tmp, with_pip=True)
        python = str(Path(tmp) / "bin" / "python")
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins], check=True)
        floor = probe(python)
        versions = subprocess.run([python, "-c", "import transformers, tokenizers; "
                                   "print(transformers.__version__, tokenizers.__version__)"],
                                  capture_output=True, text=True).stdout.split()
    current = probe(sys.executable)
    if floor != current:
        print(f"check_floor: the shipped tokenizer differs on transformers {versions}: {floor} vs {current}")
        return 1
    print(f"check_floor: shipped tokenizer files load the same on transformers {versions[0]} / tokenizers "
          f"{versions[1]} (declared floors) as on the installed versions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
