"""The ``trellis`` command refuses bad options by name, before any model loads, and loads the
model its options name (a GGUF too)."""

import argparse
import subprocess
import sys

import pytest
import torch

from trellis import cli
from trellis.model_options import command_errors
from trellis.models.embedded import embedded_gguf_path
from trellis.models.llama import TrellisLlama


@pytest.mark.parametrize(("argv", "message"), [
    (["demo", "--max-new-tokens", "0"], "argument --max-new-tokens: must be a positive integer, got 0"),
    (["demo", "--block-size", "3"], "argument --block-size: block_size must be a power of two"),
    (["demo", "--device", "gpu"], "argument --device: 'gpu' names no device"),
    (["demo", "--questions", "caf\udce9"], "argument --questions: not UTF-8 text: b'caf\\xe9'"),  # argv bytes 63 61 66 e9
    (["serve", "--api-key", "caf\udce9"], "argument --api-key: not UTF-8 text"),
    (["serve", "--served-model-name", "\udcff"], "argument --served-model-name: not UTF-8 text"),
    (["grid", "generate", "--stages", "2", "--questions", "\udcff"], "argument --questions: not UTF-8 text: b'\\xff'"),
    (["demo", "--gguf-file", "model.gguf"], "--gguf-file names a file inside --model: give --model too"),
    (["serve", "--port", "70000"], "argument --port: a port is 0 to 65535, got 70000"),
    (["serve", "--num-blocks", "0"], "argument --num-blocks: must be a positive integer, got 0"),
    (["serve", "--threads", "0"], "argument --threads: must be a positive integer, got 0"),
    (["grid", "generate", "--stages", "2", "--threads", "-1"], "argument --threads: must not be negative, got -1"),
    (["grid", "serve", "--stages", "2", "--prefix-cache", "x"], "unrecognized arguments: --prefix-cache x"),
    (["serve", "--kv-cache-memory", "inf"], "--kv-cache-memory: a size must be a positive, whole number of bytes, got 'inf'"),
    (["serve", "--kv-cache-memory", "1e400"], "a size must be a positive, whole number of bytes, got '1e400'"),
    (["serve", "--kv-cache-memory", "nan"], "a size must be a positive, whole number of bytes, got 'nan'"),
    (["serve", "--kv-cache-memory", "0.5"], "a size must be a positive, whole number of bytes, got '0.5'"),
    (["serve", "--max-body-bytes", "1.5"], "a size must be a positive, whole number of bytes, got '1.5'"),
    (["grid", "stage", "--world-size", "2"], "trellis grid stage needs --rank"),
    (["grid", "serve", "--world-size", "2", "--rank", "2"], "rank 2 is not in a grid of 2 stages"),
    (["grid", "generate", "--stages", "2", "--rank", "1"], "--stages starts a whole grid on this machine"),
    (["grid", "generate", "--stages", "2", "--gguf-file", "model.gguf"], "--gguf-file names a file inside --model"),
])
def test_bad_options_are_refused_by_name_before_a_model_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_the_demo_never_replaces_a_file_that_is_not_a_prefix_cache(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("a mistyped --prefix-cache must not cost this file\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--prefix-cache", str(notes)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "exists and is not a saved prefix cache" in err and "Traceback" not in err
    assert notes.read_text() == "a mistyped --prefix-cache must not cost this file\n"


def gguf_only_dir(tmp_path):
    (tmp_path / "model.gguf").symlink_to(embedded_gguf_path())
    return tmp_path


def test_a_gguf_only_directory_needs_its_file_named(tmp_path, capsys):
    model = str(gguf_only_dir(tmp_path))
    for argv, message in [(["demo", "--model", model], "holds GGUF files but no config.json: name one with --gguf-file"),
                          (["demo", "--model", model, "--gguf-file", "other.gguf"], "'other.gguf': no such file in")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_demo_runs_a_gguf_kept_quantized_as_the_embedded_one(tmp_path, capsys):
    """``--gguf-file`` reads a GGUF's weights and tokenizer; ``--keep-quantized`` keeps its blocks:
    the embedded SmolLM2's GGUF in a directory of its own answers as the embedded model does."""
    question = ["--questions", "What is a radix tree?", "--max-new-tokens", "6", "--dtype", "float32"]
    cli.main(["demo", "--model", str(gguf_only_dir(tmp_path)), "--gguf-file", "model.gguf", "--keep-quantized",
              *question])
    named = capsys.readouterr().out
    cli.main(["demo", "--keep-quantized", *question])
    embedded = capsys.readouterr().out
    assert "linear layers: GGUF blocks kept quantized" in named
    answer = [line for line in named.splitlines() if line.startswith("assistant:")]
    assert answer and answer == [line for line in embedded.splitlines() if line.startswith("assistant:")]


def test_q8_activations_need_layers_kept_quantized(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--q8-activations"])
    assert exit_info.value.code == 2
    assert "--q8-activations rounds the inputs of layers kept quantized: add --keep-quantized" in capsys.readouterr().err


def test_threads_are_set_before_the_model_loads(monkeypatch, capsys):
    threads_at_load = []

    def load(*args, **kwargs):
        threads_at_load.append(torch.get_num_threads())
        raise ValueError("stop here")

    monkeypatch.setattr(TrellisLlama, "from_pretrained", load)
    before = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit):
            cli.main(["demo", "--threads", "1"])
        assert threads_at_load == [1] and "stop here" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_a_damaged_gguf_is_named_without_a_traceback(tmp_path, capsys):
    with open(embedded_gguf_path(), "rb") as whole:
        (tmp_path / "cut.gguf").write_bytes(whole.read(100_000))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--model", str(tmp_path), "--gguf-file", "cut.gguf"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"cannot read the GGUF file {tmp_path / 'cut.gguf'} (truncated, damaged or not a GGUF file)" in err


def test_the_served_name_of_a_relative_model_directory_is_the_directory_s(tmp_path, monkeypatch):
    (tmp_path / "my-llama").mkdir()
    (tmp_path / "my-llama" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "my-llama")
    served = []
    monkeypatch.setattr(cli, "run_serve", lambda args, config: served.append(config.model_name))
    (tmp_path / "current").symlink_to(tmp_path / "my-llama")
    for model in (".", "./", "../my-llama", "../current"):  # a link's own name: clients keep it as its target changes
        cli.main(["serve", "--model", model, "--port", "0"])
    assert served == ["my-llama"] * 3 + ["current"]


def test_an_interrupted_command_says_so_and_exits_130(capsys):
    with pytest.raises(SystemExit) as exit_info, command_errors(argparse.ArgumentParser(), "trellis demo"):
        raise KeyboardInterrupt
    assert exit_info.value.code == 130 and capsys.readouterr().err == "trellis demo: interrupted\n"


def test_an_interrupted_demo_saves_what_it_computed(tmp_path, monkeypatch, capsys):
    chat = cli.chat

    def interrupted_after_the_first(model, tokenizer, questions, max_new_tokens):
        chat(model, tokenizer, questions[:1], max_new_tokens)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "chat", interrupted_after_the_first)
    saved = tmp_path / "prefixes.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--questions", "Hi", "Again", "--max-new-tokens", "2", "--prefix-cache", str(saved)])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 130 and "interrupted" in err
    blocks = int(out.split("saved ")[1].split()[0])
    assert blocks > 0 and saved.is_file()


def test_a_demo_whose_reader_stops_reading_exits_quietly():
    """``trellis demo | head -1``: the closed pipe ends the demo with SIGPIPE's status, no error message."""
    demo = subprocess.Popen([sys.executable, "-m", "trellis", "demo", "--questions", "Hi", "--max-new-tokens", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    demo.stdout.readline()
    demo.stdout.close()
    err = demo.stderr.read().decode()
    assert demo.wait(timeout=300) == 141 and "Broken pipe" not in err and "Traceback" not in err, err
