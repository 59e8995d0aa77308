"""``trellis serve`` end to end: a real uvicorn server on 127.0.0.1 and the official ``openai``
client, as a user would run them. Most tests use a tiny random Llama with a character-level
tokenizer (fast, and every token decodes to one character); a few use the embedded SmolLM2.
Greedy outputs are compared with ``TrellisLlama.generate`` on the same prompt."""

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from types import SimpleNamespace

import httpx2 as httpx
import openai
import pytest
import torch
import uvicorn
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.conftest import installed
from tests.models import smollm2_dir, smollm2_tokenizer, smollm2_trellis, tiny_pair
from trellis.engine import Engine, QueueFullError, SamplingParams
from trellis.grid.rendezvous import free_port
from trellis.models.llama import TrellisLlama
from trellis.models.loading import preferred_dtype
from trellis.serve import ServeConfig, create_app
from trellis.serve.bridge import ChoiceEvent, EngineBridge, RequestHandle
from trellis.serve.completions import CompletionService, _Choice, _Job
from trellis.serve.text import TextStream, TokenBytes

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = ("You are the assistant of a small team. Answer briefly and plainly; say so when you do not know. "
          "Prefer examples over theory.")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, ids matching ``tiny_config`` (pad 0, eos 1, bos 2), with a ChatML template."""
    specials = ["<pad>", "<|im_end|>", "<s>", "<|im_start|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"] + [chr(c) for c in range(161, 256) if c != 173]
    chars += [chr(c) for c in range(0x391, 0x3D0)]
    vocab = {t: i for i, t in enumerate(specials + chars[: 256 - len(specials)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<s>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=CHATML)


class Server:
    """An app served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             timeout=120, **kwargs)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"
        assert not self.app.state.bridge.ready


@contextmanager
def serving(model, tokenizer, **settings) -> Iterator[Server]:
    server = Server(create_app(model, tokenizer, ServeConfig(**{"model_name": "tiny", **settings})))
    try:
        yield server
    finally:
        server.stop()
    model.prefix_cache.check_integrity()
    assert model.prefix_cache.stats()["live_sessions"] == 0  # nothing leaked


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def tiny():
    """A server of a tiny random model; ``expected(prompt, n)`` is ``TrellisLlama.generate``'s greedy text."""
    _, model = tiny_pair(num_blocks=1024)
    _, twin = tiny_pair()  # same weights, its own cache
    tok = char_tokenizer()

    def expected(prompt: list[int], max_new_tokens: int) -> str:
        out = twin.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
        return tok.decode(out[0, len(prompt):], skip_special_tokens=True)

    with serving(model, tok, max_tokens=400) as server:
        yield SimpleNamespace(server=server, model=model, tok=tok, expected=expected)


def chat_ids(tok, question: str, system: str = SYSTEM) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def messages(question: str, system: str = SYSTEM) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


# --- answers ---------------------------------------------------------------------------------


def test_chat_greedy_equals_generate_streamed_or_not(tiny):
    server, tok, expected = tiny.server, tiny.tok, tiny.expected
    client = server.client()
    want = expected(chat_ids(tok, "What is a radix tree?"), 24)
    reply = client.chat.completions.create(model="tiny", messages=messages("What is a radix tree?"), max_tokens=24,
                                           temperature=0)
    assert reply.choices[0].message.content == want and reply.object == "chat.completion"
    assert reply.usage.prompt_tokens == len(chat_ids(tok, "What is a radix tree?"))
    assert reply.usage.completion_tokens == 24 and reply.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages("What is a radix tree?"),
                                                 max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-2].choices[0].finish_reason == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 24
    assert usage.prompt_tokens_details.cached_tokens > 0  # the first call cached the prompt


def test_completions_take_strings_and_token_ids_one_or_many(tiny):
    server, tok, expected = tiny.server, tiny.tok, tiny.expected
    client = server.client()
    prompts = [tok("Once upon a time")["input_ids"], tok("The radix tree")["input_ids"]]
    reply = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0)
    assert [c.text for c in reply.choices] == [expected(p, 12) for p in prompts]
    assert [c.index for c in reply.choices] == [0, 1] and reply.usage.prompt_tokens == sum(map(len, prompts))
    one = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, echo=True)
    assert one.choices[0].text == "Once upon a time" + expected(prompts[0], 12)
    default = client.completions.create(model="tiny", prompt="The radix tree", temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens
    streamed = client.completions.create(model="tiny", prompt="The radix tree", max_tokens=12, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected(prompts[1], 12)


def finished_choices(server: Server, finish_reason: str) -> float:
    """``trellis_choices_finished_total`` for ``finish_reason``, from ``/metrics``."""
    metrics = httpx.get(f"{server.url}/metrics").text
    found = re.search(rf'^trellis_choices_finished_total\{{finish_reason="{finish_reason}"\}} (\S+)', metrics,
                      re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_stop_strings_cut_the_text_as_openai_does(tiny):
    server, tok, expected = tiny.server, tiny.tok, tiny.expected
    client = server.client()
    counted = {reason: finished_choices(server, reason) for reason in ("stop", "cancelled", "length")}
    full = expected(chat_ids(tok, "Tell me a story."), 40)
    stop = full[12:14]
    want = full[: full.index(stop)]
    reply = client.chat.completions.create(model="tiny", messages=messages("Tell me a story."), max_tokens=40,
                                           temperature=0, stop=[stop, "never there"], logprobs=True)
    assert reply.choices[0].message.content == want and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 40
    # A log-probability for every token counted, the one that completed the stop string included (as vLLM)
    assert "".join(e.token for e in reply.choices[0].logprobs.content) == want + stop
    assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens
    streamed = client.chat.completions.create(model="tiny", messages=messages("Tell me a story."), max_tokens=40,
                                              temperature=0, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The stop string ends the choice on its last allowed token: the engine's session ends on its
    # length, the client reads "stop", and so do the metrics.
    last = client.chat.completions.create(model="tiny", messages=messages("Tell me a story."), max_tokens=14,
                                          temperature=0, stop=full[12:14], stream=True)
    assert list(last)[-1].choices[0].finish_reason == "stop"
    assert {reason: finished_choices(server, reason) - n for reason, n in counted.items()} == {
        "stop": 3, "cancelled": 0, "length": 0}


def test_logprobs_in_both_formats(tiny):
    server, tok = tiny.server, tiny.tok
    client = server.client()
    reply = client.chat.completions.create(model="tiny", messages=messages("Hi"), max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    for e in content:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token and e.logprob == e.top_logprobs[0].logprob
    ids = tok("abc")["input_ids"]
    text = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=2, echo=True)
    lp = text.choices[0].logprobs
    assert lp.tokens[:3] == ["a", "b", "c"] and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == 6 and all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == list(range(6))
    assert text.usage.prompt_tokens_details.cached_tokens == 0  # prompt log-probabilities compute every position


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece's kind (Llama 2's): pieces with ▁ for a space, and a token per byte no piece covers."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁": 257, "a": 258, "é": 259}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("tokenizer", [smollm2_tokenizer, byte_fallback_tokenizer])
def test_token_bytes_join_to_the_text_where_a_character_spans_tokens(tokenizer):
    """OpenAI's ``bytes`` of a log-probability entry are the token's own bytes: a token holding
    part of a character decodes alone to U+FFFD, and its bytes still join to the text."""
    tok = tokenizer()
    token_bytes = TokenBytes(tok)
    text = "aé 😀 世界"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some token holds part of a character
    assert b"".join(token_bytes(i) for i in ids).decode().strip() == text
    special = tok.all_special_ids[0]
    assert token_bytes(special) == tok.decode([special]).encode()


def test_a_stream_sends_each_choice_one_finish_and_continues_text_offsets(tiny):
    """A choice cut by a stop string while another still runs gets one chunk with its finish
    reason and nothing after it; a streamed completion's text_offset continue across chunks."""
    server, tok, expected = tiny.server, tiny.tok, tiny.expected
    client = server.client()
    prompts = [tok("abc")["input_ids"], tok("xyz")["input_ids"]]
    stop = expected(prompts[0], 12)[2:4]
    settings = {"model": "tiny", "prompt": prompts, "max_tokens": 12, "temperature": 0, "stop": stop, "logprobs": 0,
                "echo": True}
    whole = client.completions.create(**settings)
    chunks = list(client.completions.create(**settings, stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        finishes = [i for i, c in enumerate(mine) if c.finish_reason is not None]
        assert finishes == [len(mine) - 1], (index, [c.finish_reason for c in mine])
        offsets = [o for c in mine if c.logprobs for o in c.logprobs.text_offset]
        assert offsets == whole.choices[index].logprobs.text_offset


def test_null_asks_for_the_default_and_a_model_can_be_retrieved(tiny):
    server = tiny.server
    client = server.client()
    reply = client.chat.completions.create(model="tiny", messages=messages("Hi"), max_tokens=2, temperature=0,
                                           n=None, stream=None, logprobs=None)
    assert len(reply.choices) == 1 and reply.choices[0].logprobs is None
    text = client.completions.create(model="tiny", prompt="ab", max_tokens=2, echo=None, n=None)
    assert len(text.choices) == 1 and not text.choices[0].text.startswith("ab")
    assert client.models.retrieve("tiny").id == "tiny"
    no_ops = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"},
              "store": False, "tool_choice": "none", "parallel_tool_calls": False}  # what clients send by default
    reply = client.chat.completions.create(model="tiny", messages=messages("Hi"), max_tokens=2, temperature=0,
                                           **no_ops)
    assert reply.choices[0].message.content == client.chat.completions.create(
        model="tiny", messages=messages("Hi"), max_tokens=2, temperature=0).choices[0].message.content
    # An assistant's reply sent back whole (model_dump(): OpenAI's null fields, or no tool calls)
    answer = client.chat.completions.create(model="tiny", messages=messages("Hi"), max_tokens=2, temperature=0)
    for replayed in (answer.choices[0].message.model_dump(), {"role": "assistant", "content": "ab", "tool_calls": []}):
        conversation = [*messages("Hi"), replayed, *messages("Again")]
        plain = [*messages("Hi"), {"role": "assistant", "content": replayed["content"]}, *messages("Again")]
        assert client.chat.completions.create(model="tiny", messages=conversation, max_tokens=2, temperature=0
                                              ).choices[0].message.content == client.chat.completions.create(
            model="tiny", messages=plain, max_tokens=2, temperature=0).choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("other")


def test_a_400_names_the_parameter_the_client_used(tiny):
    server = tiny.server
    chat = {"messages": HELLO}
    for path, body, param in [
            (CHAT, {**chat, "stop": ["x"] * 20}, "stop"), (CHAT, {**chat, "stop": ""}, "stop"),
            (CHAT, {**chat, "max_completion_tokens": 100000}, "max_completion_tokens"),
            (CHAT, {**chat, "max_tokens": 100000}, "max_tokens"), (CHAT, {**chat, "temperature": 1e-40}, "temperature"),
            (CHAT, {**chat, "max_tokens": 2, "max_completion_tokens": 2}, "max_completion_tokens"),
            (CHAT, {**chat, "stream_options": {"include_usage": True}}, "stream_options"),
            (CHAT, {**chat, "temperature": float("nan")}, "temperature"), (CHAT, {**chat, "top_p": float("nan")}, "top_p"),
            (COMPLETIONS, {"prompt": []}, "prompt"), (COMPLETIONS, {"prompt": ["a", ""]}, "prompt"),
            (COMPLETIONS, {"prompt": ""}, "prompt"), (COMPLETIONS, {"prompt": [-1]}, "prompt"),
            (CHAT, {"messages": [{"role": "user", "content": "x" * 600}]}, "messages")]:
        reply = httpx.post(f"{server.url}{path}", content=json.dumps(body), timeout=30)  # (json= refuses NaN)
        error = reply.json()["error"]
        assert reply.status_code == 400 and error["param"] == param, (body, error)
        assert "less than" not in error["message"], (body, error)  # NaN is no number too large


def test_a_refused_prompt_refuses_the_request_before_any_is_queued(tiny, monkeypatch):
    server, tok = tiny.server, tiny.tok
    client = server.client()
    cancelled = finished_choices(server, "cancelled")
    too_long = [5] * (tiny.model.config.max_position_embeddings - 2)
    with pytest.raises(openai.BadRequestError, match="max_tokens 10 after a prompt of") as refused:
        client.completions.create(model="tiny", prompt=[tok("ab")["input_ids"], too_long], max_tokens=10)
    assert refused.value.body["param"] == "max_tokens"
    assert finished_choices(server, "cancelled") == cancelled
    queued = []
    add = server.app.state.engine.add
    monkeypatch.setattr(server.app.state.engine, "add", lambda *args, **kwargs: queued.append(add(*args, **kwargs)))
    with pytest.raises(openai.BadRequestError, match="token id 999 is outside the vocabulary") as refused:
        client.completions.create(model="tiny", prompt=[tok("ab")["input_ids"], [5, 999]], max_tokens=10)
    assert refused.value.body["param"] == "prompt" and not queued  # the first prompt was not computed meanwhile


def test_the_servers_max_tokens_binds_the_defaults():
    """--max-tokens bounds what a request without max_tokens gets too: chat's --default-max-tokens
    and completions' 16."""
    _, model = tiny_pair(num_blocks=1024)
    with serving(model, char_tokenizer(), max_tokens=10) as server:
        client = server.client()
        chat = client.chat.completions.create(model="tiny", messages=messages("Count to 30 thousand."), temperature=0)
        text = client.completions.create(model="tiny", prompt="The radix tree", temperature=0)
    assert chat.usage.completion_tokens == text.usage.completion_tokens == 10
    assert chat.choices[0].finish_reason == text.choices[0].finish_reason == "length"


def test_a_small_kv_pool_cuts_the_default_and_refusals_name_what_does_not_fit(monkeypatch):
    """Admission reserves a request's whole answer in the pool. A request without max_tokens gets
    what the pool can hold; one the pool could never hold is refused naming the prompt, n or the
    limit the client gave, in the client's words, before any of its prompts is queued."""
    _, model = tiny_pair(num_blocks=16)  # 16 blocks of 4 tokens
    with serving(model, char_tokenizer()) as server:
        client = server.client()
        for n in (1, 3):
            reply = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, n=n)
            assert 0 < reply.usage.completion_tokens <= n * (64 - reply.usage.prompt_tokens + 1)
        queued = []
        add = server.app.state.engine.add
        monkeypatch.setattr(server.app.state.engine, "add", lambda *args, **kwargs: queued.append(add(*args, **kwargs)))
        for path, body, param in [
                (COMPLETIONS, {"prompt": [5] * 65, "max_tokens": 1}, "prompt"),
                (COMPLETIONS, {"prompt": [[5] * 10, [5] * 65], "max_tokens": 1}, "prompt"),
                (COMPLETIONS, {"prompt": [5] * 62, "max_tokens": 1, "n": 2}, "n"),  # each copies the partial block
                (COMPLETIONS, {"prompt": [5] * 10, "max_tokens": 60}, "max_tokens"),
                (COMPLETIONS, {"prompt": [5] * 10, "max_tokens": 40, "n": 2}, "max_tokens"),
                (CHAT, {"messages": HELLO, "max_completion_tokens": 60}, "max_completion_tokens")]:
            reply = httpx.post(f"{server.url}{path}", json=body, timeout=30)
            error = reply.json()["error"]
            assert reply.status_code == 400 and error["param"] == param, (body, error)
            assert "KV cache (16 blocks of 4 tokens" in error["message"], error
            assert not re.search(r"req_\d|max_new_tokens", error["message"]), error
        assert not queued


def test_n_choices_share_the_prompt(tiny):
    server, tok, expected = tiny.server, tiny.tok, tiny.expected
    client = server.client()
    ids = chat_ids(tok, "Pick a number.")
    reply = client.chat.completions.create(model="tiny", messages=messages("Pick a number."), max_tokens=8,
                                           temperature=0, n=3)
    assert [c.message.content for c in reply.choices] == [expected(ids, 8)] * 3
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 24
    sampled = client.chat.completions.create(model="tiny", messages=messages("Pick a number."), max_tokens=8,
                                             temperature=1.0, seed=3, n=3)
    again = client.chat.completions.create(model="tiny", messages=messages("Pick a number."), max_tokens=8,
                                           temperature=1.0, seed=3, n=3)
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in sampled.choices}) > 1


# --- many clients ------------------------------------------------------------------------------


def test_sixteen_concurrent_clients_share_the_system_prompt(tiny):
    server, model, tok, expected = tiny.server, tiny.model, tiny.tok, tiny.expected
    questions = [f"Question {i}: what is {i} times {i + 3}?" for i in range(16)]
    model.prefix_cache.reset()  # nobody has computed the system prompt yet

    async def ask_all() -> list:
        client = server.async_client()
        calls = [client.chat.completions.create(model="tiny", messages=messages(q), max_tokens=16, temperature=0)
                 for q in questions]
        return await asyncio.gather(*calls)

    replies = asyncio.run(ask_all())
    client = server.client()
    for question, reply in zip(questions, replies):
        alone = client.chat.completions.create(model="tiny", messages=messages(question), max_tokens=16, temperature=0)
        assert reply.choices[0].message.content == alone.choices[0].message.content
        assert reply.choices[0].message.content == expected(chat_ids(tok, question), 16)
    prompts = [chat_ids(tok, q) for q in questions]
    common = next(i for i in range(len(prompts[0])) if len({tuple(p[: i + 1]) for p in prompts}) > 1)
    cached = sorted(r.usage.prompt_tokens_details.cached_tokens for r in replies)
    assert cached[0] == 0  # only one computed the shared system prompt: the others took its blocks
    assert cached[1] >= common // 4 * 4 > 100




def test_a_client_that_disconnects_frees_its_blocks(tiny):
    server, model, tok = tiny.server, tiny.model, tiny.tok
    engine = server.app.state.engine
    before = finished_choices(server, "cancelled")
    question = "Count to 30 thousand."  # greedy: no stop token in its first 320 tokens
    stream = server.client().chat.completions.create(model="tiny", messages=messages(question), max_tokens=300,
                                                     temperature=0, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    assert engine.running
    stream.close()
    # The server sees the disconnect on its own schedule: wait for the cancellation, then for the engine.
    wait_until(lambda: finished_choices(server, "cancelled") == before + 1)
    wait_until(lambda: not engine.running and model.prefix_cache.stats()["live_sessions"] == 0)
    ids = chat_ids(tok, question)
    assert model.prefix_cache.admission_cost(ids + [5]).cached_tokens >= len(ids) // 4 * 4  # the prefix stays cached
    # A client waiting for a JSON answer gives up, well before the 400 tokens are done (~0.3 s on a
    # 2-core machine: a longer wait let the answer finish first on a fast day).
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}{COMPLETIONS}", json={"prompt": "story 14", "max_tokens": 400, "temperature": 0},
                   timeout=0.05)
    wait_until(lambda: finished_choices(server, "cancelled") == before + 2)
    wait_until(lambda: not engine.running and model.prefix_cache.stats()["live_sessions"] == 0)
    model.prefix_cache.check_integrity()


def test_a_client_gone_before_its_body_is_whole_is_no_server_error(tiny, caplog):
    host, port = tiny.server.url.removeprefix("http://").split(":")
    with caplog.at_level("ERROR", logger="trellis.serve"), socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n" + b'{"prompt": "ab')
    wait_until(lambda: httpx.get(f"{tiny.server.url}/health").status_code == 200)
    time.sleep(0.5)  # the server reads the closed connection on its own schedule
    assert "request failed" not in caplog.text


# --- limits and bad input ----------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "hello"}]
BAD_REQUESTS = [
    (CHAT, b'{"messages": [', 400, "not valid JSON"),
    (CHAT, b'{"max_tokens": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),  # past Python's 4300-digit limit
    (CHAT, b"[1, 2]", 400, "must be a JSON object"),
    (CHAT, {"messages": HELLO, "frequency_penalty": 0.5}, 400, "frequency_penalty: only 0 (or null) is supported"),
    (CHAT, {"messages": HELLO, "tools": []}, 400, "unknown or unsupported parameter 'tools'"),
    (CHAT, {"messages": HELLO, "tool_choice": "auto"}, 400, "tool_choice: only \"none\""),
    (COMPLETIONS, {"prompt": "hi", "response_format": {"type": "json_object"}}, 400, "response_format"),
    (CHAT, {"messages": HELLO, "max_tokens": "ten"}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    (CHAT, {"messages": HELLO, "temperature": 2.5}, 400, "temperature"),
    (CHAT, {"messages": HELLO, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": HELLO, "temperature": 1e-300}, 400, "temperature must be 0 (greedy) or at least"),
    (CHAT, {"messages": HELLO, "n": 0}, 400, "n"),
    (CHAT, {"messages": HELLO, "n": 50}, 400, "at most 8 choices"),
    (CHAT, {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": 100000}, 400, "exceeds this server's limit of 400"),
    (CHAT, {"messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs: requires logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content: part 0 is of type 'image_url': only text parts"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "part 0 needs its text"),
    (CHAT, {"messages": HELLO, "stop": ["x"] * 20}, 400, "stop"),
    (CHAT, {"messages": HELLO, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CHAT, {"messages": HELLO, "model": "gpt-4"}, 404, "does not exist"),
    (COMPLETIONS, {"prompt": ""}, 400, "empty prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [5, "a"]}, 400, "prompt must be"),
    (COMPLETIONS, {"prompt": [5, 999]}, 400, "token id 999 is outside the vocabulary"),
    (COMPLETIONS, {"prompt": [5] * 600}, 400, "context of 512 tokens"),
    (COMPLETIONS, {"prompt": [5] * 300, "max_tokens": 300}, 400, "exceeds the model's context of 512 tokens"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    (COMPLETIONS, b'{"prompt": "hi \\ud800 there"}', 400, "a lone UTF-16 surrogate (\\ud800)"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\udc00"}]}', 400, "a lone UTF-16 surrogate (\\udc00)"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}]}, 400,
     "messages.0.content: part 0 has unknown or unsupported fields ['cache_control']"),
    (CHAT, {"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format: only {\"type\": \"text\"}"),
    (CHAT, {"messages": HELLO, "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400,
     "tool_choice: only \"none\""),
    (CHAT, {"messages": [*HELLO, {"role": "assistant", "content": "", "refusal": "no"}]}, 400,
     "messages.1.refusal: only null is supported"),
    (CHAT, {"messages": [*HELLO, {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]}, 400,
     "messages.1.tool_calls: only null"),
    (CHAT, {"messages": [*HELLO, {"role": "assistant", "content": "", "audio": []}]}, 400,
     "messages.1.audio: only null"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    (COMPLETIONS, b"x" * (5 << 20), 413, "exceeds this server's limit"),
]


def test_bad_requests_get_a_4xx_with_a_message_and_disturb_nothing(tiny):
    server, model = tiny.server, tiny.model
    client = server.client()
    client.completions.create(model="tiny", prompt="warm", max_tokens=2)
    before = model.prefix_cache.stats()
    for path, body, status, message in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else None
        reply = httpx.post(f"{server.url}{path}", content=content, json=None if content else body, timeout=30)
        assert reply.status_code == status, (body, reply.text)
        error = reply.json()["error"]
        assert message in error["message"] and error["type"], (body, error)
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404
    assert httpx.get(f"{server.url}{CHAT}").status_code == 405
    assert model.prefix_cache.stats() == before
    model.prefix_cache.check_integrity()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=-1)
    assert client.completions.create(model="tiny", prompt="still here", max_tokens=2).usage.completion_tokens == 2


def test_overload_gets_503_and_the_server_keeps_serving():
    _, model = tiny_pair(num_blocks=64)
    tok = char_tokenizer()
    with serving(model, tok, max_running=1, max_waiting=1, api_key="secret") as server:
        client = server.client(api_key="secret")

        async def burst() -> list:
            aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="secret", max_retries=0)
            calls = [aclient.completions.create(model="tiny", prompt=f"request {i}", max_tokens=150, temperature=0)
                     for i in range(5)]
            return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(burst())
        refused = [r for r in results if isinstance(r, openai.APIStatusError)]
        served = [r for r in results if not isinstance(r, Exception)]
        assert len(refused) + len(served) == 5 and refused and served
        assert all(r.status_code == 503 and r.response.headers["retry-after"] == "1" for r in refused)
        assert all(r.choices[0].finish_reason in ("stop", "length") and r.choices[0].text for r in served)
        assert client.completions.create(model="tiny", prompt="after", max_tokens=3).usage.completion_tokens == 3
        with pytest.raises(openai.BadRequestError, match="at most 1 choices"):  # they would run at once
            client.completions.create(model="tiny", prompt="two", max_tokens=2, n=2)
        with pytest.raises(openai.BadRequestError, match="more than this server's KV cache"):  # 256 tokens
            client.completions.create(model="tiny", prompt=[5] * 200, max_tokens=100)
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
        assert [m.id for m in client.models.list()] == ["tiny"]


def test_extreme_but_valid_sampling_values_are_served(tiny):
    """OpenAI's and vLLM's ranges: any top_k (past the vocabulary and int64 alike: no limit), a
    top_p as small as a double goes (the most likely token only: greedy's text), an int64 seed."""
    url = f"{tiny.server.url}{CHAT}"
    body = {"messages": HELLO, "max_tokens": 4, "temperature": 1.0}
    greedy = httpx.post(url, json={**body, "temperature": 0}, timeout=30).json()["choices"][0]["message"]["content"]
    for extra in ({"top_k": 2**63}, {"top_p": 5e-324}, {"seed": -(2**63)}):
        reply = httpx.post(url, json={**body, **extra}, timeout=30)
        assert reply.status_code == 200, (extra, reply.text)
        if "top_p" in extra:
            assert reply.json()["choices"][0]["message"]["content"] == greedy


class Held:
    """A tokenizer method patched to stop, on the calls ``holds(*args, **kwargs)`` picks, until
    ``answered`` has run: the server's event loop must answer meanwhile."""

    def __init__(self, monkeypatch, tokenizer, method: str, holds) -> None:
        self.reached, self.released = threading.Event(), threading.Event()
        original = getattr(type(tokenizer), method)

        def held(tok, *args, **kwargs):
            if not self.released.is_set() and holds(*args, **kwargs):
                self.reached.set()
                assert self.released.wait(60)
            return original(tok, *args, **kwargs)

        monkeypatch.setattr(type(tokenizer), method, held)

    def post_while_health_answers(self, server: Server, body: dict) -> httpx.Response:
        """POST ``body`` to the completions endpoint; once the tokenizer is held, /health answers."""
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(httpx.post, f"{server.url}{COMPLETIONS}", json=body, timeout=90)
            try:
                assert self.reached.wait(30)
                assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
            finally:
                self.released.set()
            return reply.result()


def test_a_prompt_is_tokenized_off_the_event_loop(tiny, monkeypatch):
    """Tokenizing a large prompt (a 4 MiB body takes seconds) holds up no other client: here the
    tokenizer is held until /health has answered."""
    held = Held(monkeypatch, tiny.tok, "__call__", lambda text, *args, **kwargs: text == "held in the tokenizer")
    reply = held.post_while_health_answers(tiny.server, {"prompt": "held in the tokenizer", "max_tokens": 2})
    assert reply.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_an_echoed_prompts_logprobs_are_listed_off_the_event_loop(monkeypatch, stream):
    """Listing an echoed prompt's log-probabilities decodes each of its tokens (a 2000-token
    prompt's took ~0.4 s on the event loop); /health answers while that decode is held. (A server
    of its own: each token's text is decoded once per server.)"""
    _, model = tiny_pair()
    tok = char_tokenizer()
    (marked,) = tok("\u03a9")["input_ids"]
    held = Held(monkeypatch, tok, "decode", lambda ids, *args, **kwargs: not args and not kwargs and list(ids) == [marked])
    body = {"prompt": "\u03a9 marks the spot", "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1,
            "stream": stream}
    with serving(model, tok) as server:
        reply = held.post_while_health_answers(server, body)
    assert reply.status_code == 200
    if stream:
        first = json.loads(reply.text.split("\n\n")[0].removeprefix("data: "))["choices"][0]
    else:
        first = reply.json()["choices"][0]
    assert first["text"].startswith("\u03a9 marks the spot")
    assert first["logprobs"]["tokens"][:3] == ["\u03a9", " ", "m"] and first["logprobs"]["token_logprobs"][0] is None


def test_an_engine_error_fails_that_request_only(tiny):
    server, model = tiny.server, tiny.model
    runner = server.app.state.engine.runner
    poison = tiny.tok("poison")["input_ids"]
    forward = runner.forward

    def failing_forward(manager, seqs, *args, **kwargs):
        if any(seq.token_ids[: len(poison)] == poison for seq in seqs):
            raise RuntimeError("injected failure")
        return forward(manager, seqs, *args, **kwargs)

    async def both() -> list:
        client = server.async_client()
        return await asyncio.gather(
            client.completions.create(model="tiny", prompt="poison", max_tokens=5, temperature=0),
            client.completions.create(model="tiny", prompt="healthy", max_tokens=5, temperature=0),
            return_exceptions=True)

    runner.forward = failing_forward
    try:
        failed, served = asyncio.run(both())
    finally:
        del runner.forward
    assert isinstance(failed, openai.InternalServerError) and "injected failure" in failed.message
    assert served.usage.completion_tokens == 5 and served.choices[0].text == tiny.expected(
        tiny.tok("healthy")["input_ids"], 5)
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_a_runner_that_can_serve_nothing_more_is_a_503_and_metrics_still_render(tiny):
    """A grid that lost a stage (its runner's ``failure`` set) answers new requests 503 naming why,
    as /health does, and /metrics renders without the KV pool it can no longer read."""
    server = tiny.server
    runner = server.app.state.engine.runner
    runner.failure = "stage 1: the link failed"
    try:
        reply = httpx.post(f"{server.url}{COMPLETIONS}", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert reply.status_code == 503 and "stage 1: the link failed" in reply.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health", timeout=60).status_code == 503
        scraped = httpx.get(f"{server.url}/metrics", timeout=60)
        assert scraped.status_code == 200 and "trellis_kv_cache_blocks" not in scraped.text
    finally:
        runner.failure = None
    assert "trellis_kv_cache_blocks" in httpx.get(f"{server.url}/metrics", timeout=60).text


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_request_whose_choice_fails_stops_its_other_choices(tiny, stream):
    """A request with an error to report answers it at once (a stream: its error event, then
    [DONE]): its other prompts stop rather than run to their end for an answer nobody gets."""
    server, model = tiny.server, tiny.model
    runner = server.app.state.engine.runner
    poison, healthy = tiny.tok("poison")["input_ids"], tiny.tok("healthy")["input_ids"]
    assert len(tiny.expected(healthy, 300)) >= 50  # alone it would run on for many steps
    forward = runner.forward

    def failing_forward(manager, seqs, *args, **kwargs):
        if any(seq.token_ids[: len(poison)] == poison for seq in seqs):
            raise RuntimeError("injected failure")
        return forward(manager, seqs, *args, **kwargs)

    generated = server.app.state.metrics.generation_tokens._value.get()
    body = {"prompt": ["poison", "healthy"], "max_tokens": 300, "temperature": 0, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}  # no usage after the error event
    runner.forward = failing_forward
    try:
        reply = httpx.post(f"{server.url}{COMPLETIONS}", json=body, timeout=120)
    finally:
        del runner.forward
    if stream:
        events = [line.removeprefix("data: ") for line in reply.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "injected failure" in json.loads(events[-2])["error"]["message"], events
    else:
        assert reply.status_code == 500 and "injected failure" in reply.json()["error"]["message"]
    wait_until(lambda: model.prefix_cache.stats()["live_sessions"] == 0)
    assert server.app.state.metrics.generation_tokens._value.get() - generated < 10


def test_a_choice_cancelled_before_its_last_event_arrives_is_counted_once(tiny):
    """A client that goes away cancels its unfinished choices (counted as cancelled); a last event
    already on its way ends the choice without counting it again."""
    server = tiny.server
    metrics = server.app.state.metrics
    service = CompletionService(server.app.state.bridge, tiny.tok, server.app.state.config, (), 64)
    handle = RequestHandle([SimpleNamespace()], asyncio.Queue(), 0, None)
    job = _Job("cmpl-test", 0, [[5, 6]], asyncio.Queue(), [_Choice(0, 0, handle, 0, TextStream(tiny.tok))])
    counts = {reason: metrics.finished_choices.labels(reason)._value.get() for reason in ("cancelled", "stop")}
    service._cancel(job)
    service._apply(job, ChoiceEvent(0, [7], [], 0, finish_reason="stop"))
    assert metrics.finished_choices.labels("cancelled")._value.get() == counts["cancelled"] + 1
    assert metrics.finished_choices.labels("stop")._value.get() == counts["stop"]


def test_submitting_while_the_server_closes_is_refused_not_left_waiting(monkeypatch):
    """A request that passed the readiness check as the server began to close is refused (a 503),
    not queued behind the engine thread's last abort, where nothing would ever answer it."""
    _, model = tiny_pair()
    bridge = EngineBridge(Engine(model))
    bridge.start()
    real = asyncio.get_running_loop

    def closing_meanwhile():
        bridge.close()  # lands between submit's check and its queueing
        return real()

    async def submit():
        monkeypatch.setattr(asyncio, "get_running_loop", closing_meanwhile)
        try:
            bridge.submit([([5, 6, 7, 8, 9], SamplingParams(max_new_tokens=3))], 1, asyncio.Queue())
        finally:
            monkeypatch.setattr(asyncio, "get_running_loop", real)

    with pytest.raises(RuntimeError, match="the engine is not running"):
        asyncio.run(submit())
    assert not bridge.engine.has_work and model.prefix_cache.stats()["live_sessions"] == 0


def test_prompts_the_queue_has_no_room_for_are_refused_together():
    """A request of several prompts that would pass --max-waiting is refused (a 503) before any of
    them is queued, not after the first ones were."""
    _, model = tiny_pair()
    engine = Engine(model, max_running=1, max_waiting=2)
    bridge = EngineBridge(engine)
    bridge.start()

    async def submit() -> None:
        queue = asyncio.Queue()
        running = bridge.submit([([5, 6, 7], SamplingParams(max_new_tokens=400))], 1, queue)
        wait_until(lambda: engine.running)
        bridge.submit([([8, 9], SamplingParams(max_new_tokens=2))], 1, queue)  # waits: one runs at a time
        try:
            with pytest.raises(QueueFullError, match="the limit of 2"):
                bridge.submit([([10, 11], SamplingParams(max_new_tokens=2))] * 2, 1, queue)
            assert engine.num_waiting == 1
        finally:
            bridge.cancel(running[0])

    try:
        asyncio.run(submit())
    finally:
        bridge.close()
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_stopping_the_server_mid_stream_leaks_nothing():
    _, model = tiny_pair()
    tok = char_tokenizer()
    with serving(model, tok) as server:
        stream = server.client().completions.create(model="tiny", prompt="a long story", max_tokens=400, stream=True)
        next(iter(stream))
        server.server.should_exit = True  # what Ctrl-C does; serving() then joins and checks for leaks
        with suppress(openai.APIError, httpx.HTTPError):  # the stream ends: finished within the grace period,
            for _ in stream:                                # or cut off
                pass


def test_metrics_describe_traffic_latency_and_the_cache(tiny):
    server = tiny.server
    client = server.client()
    for _ in range(2):
        client.chat.completions.create(model="tiny", messages=messages("metrics?"), max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("trellis_prompt_tokens_total", "trellis_cached_prompt_tokens_total", "trellis_prefix_cache_hit_rate",
                 "trellis_generation_tokens_total", "trellis_requests_running", "trellis_requests_waiting",
                 "trellis_kv_cache_evicted_blocks_total", "trellis_time_to_first_token_seconds_bucket",
                 "trellis_inter_token_latency_seconds_bucket", "trellis_e2e_request_latency_seconds_count"):
        assert re.search(rf"^{name}(\{{[^}}]*\}})? ", text, re.MULTILINE), name
    for state in ("free", "cached", "tail", "live"):
        assert f'trellis_kv_cache_blocks{{state="{state}"}}' in text
    hit_rate = float(re.search(r"^trellis_prefix_cache_hit_rate (\S+)", text, re.MULTILINE).group(1))
    assert 0 < hit_rate < 1


# --- the embedded SmolLM2 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    model = smollm2_trellis(num_blocks=256)
    tok = smollm2_tokenizer()
    with serving(model, tok, model_name="smollm2") as server:
        yield SimpleNamespace(server=server, model=model, tok=tok)


def test_smollm2_chat_equals_generate(smollm2):
    server, tok = smollm2.server, smollm2.tok
    twin = smollm2_trellis(num_blocks=64)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(question, add_generation_prompt=True, return_dict=True)["input_ids"]
    out = twin.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    reply = server.client().chat.completions.create(model="smollm2", messages=question, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_lm_eval_local_completions_scores_as_trellis_eval(smollm2):
    installed("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from trellis.eval import loglikelihood

    server, tok = smollm2.server, smollm2.tok
    docs = [json.loads(line) for line in (ROOT / "scripts" / "data" / "reading_mc.jsonl").read_text().splitlines()[:2]]
    # The sample task's requests (trellis_reading_mc: its context, then " " + each choice), and an empty context.
    pairs = [(doc["context"], " " + choice) for doc in docs for choice in doc["choices"]] + [("", "The sky is blue")]
    lm = get_model("local-completions")(base_url=f"{server.url}/v1/completions", model="smollm2",
                                        tokenizer=str(smollm2_dir()), tokenizer_backend="huggingface",
                                        max_retries=1, timeout=120)
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    want = loglikelihood(smollm2_trellis(num_blocks=64), tok, pairs)
    for (logprob, greedy), (want_logprob, want_greedy) in zip(got, want, strict=True):
        assert logprob == pytest.approx(want_logprob, abs=1e-4) and greedy == want_greedy


@pytest.mark.parametrize(("grid", "stop"), [(None, signal.SIGINT), (None, signal.SIGTERM), ("stages", signal.SIGTERM),
                                            ("world-size", signal.SIGTERM)],
                         ids=["serve-ctrl-c", "serve-sigterm", "grid-sigterm", "grid-two-commands"])
def test_the_command_serves_and_stops_cleanly(tmp_path, grid, stop):
    """``python -m trellis serve`` (or ``grid serve`` over two stages: ``--stages 2``, or as on two
    machines, the coordinator given ``--world-size`` alone and the stage its own command) on a
    tiny saved model: answers, then exits with status 0 on Ctrl-C or SIGTERM, a grid's stages
    stopped in order."""
    model = tiny_pair()[1]
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    port, master = free_port(), ["--master-port", str(free_port())]
    where = {None: ["serve"], "stages": ["grid", "serve", "--stages", "2", *master],
             "world-size": ["grid", "serve", "--world-size", "2", *master]}[grid]
    command = [sys.executable, "-m", "trellis", *where, "--model", str(tmp_path), "--port", str(port),
               "--num-blocks", "128", "--block-size", "4", "--log-level", "warning"]
    saved = tmp_path / "prefixes.safetensors"
    if grid is None:  # a grid's stages hold the K/V: only one process's server saves its prefixes
        command += ["--prefix-cache", str(saved)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stage = None
    if grid == "world-size":
        stage = subprocess.Popen([sys.executable, "-m", "trellis", "grid", "stage", "--rank", "1", "--world-size", "2",
                                  *master, "--model", str(tmp_path), "--block-size", "4", "--num-blocks", "128"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: _healthy(port) or process.poll() is not None, timeout=120)
        assert process.poll() is None, process.stdout.read()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        # Greedy: a sampled answer may end early, drawing the random model's end-of-text token.
        assert client.completions.create(model=name, prompt="hi", max_tokens=3, temperature=0).usage.completion_tokens == 3
        process.send_signal(stop)
        assert process.wait(60) == 0
        if stage is not None:
            assert stage.wait(60) == 0
    finally:
        for child in (process, stage):
            if child is not None and child.poll() is None:
                child.kill()
    output = process.stdout.read() + (stage.stdout.read() if stage is not None else "")
    assert f"serving {tmp_path.name} on http://127.0.0.1:{port}/v1" in output and "Traceback" not in output
    if grid:  # the stage got the coordinator's stop, rather than losing its link
        assert "stage stopped after" in output and "failed" not in output, output
    else:  # the prefixes the request computed, saved at shutdown for the next start
        warm = TrellisLlama.from_pretrained(str(tmp_path), dtype=preferred_dtype("cpu").dtype, device="cpu",
                                            block_size=4, num_blocks=128)
        blocks = warm.load_prefix_cache(saved)
        assert blocks > 0 and f"saved {blocks} cached blocks to {saved}" in output, output


@pytest.mark.parametrize("busy", [True, False])
def test_requests_still_running_when_the_grace_period_ends_are_failed_before_it_ends(monkeypatch, busy):
    """Once shutdown begins, the engine is closed just before uvicorn's grace period ends if work
    remains (its clients then read a shutdown error, where uvicorn would cut them), else left alone."""
    from trellis.serve import server as server_module

    monkeypatch.setattr(server_module, "GRACEFUL_SHUTDOWN_S", 0.6)
    monkeypatch.setattr(server_module, "CLOSE_MARGIN_S", 0.3)
    closed: list[float] = []
    bridge = SimpleNamespace(engine=SimpleNamespace(has_work=busy), close=lambda: closed.append(time.monotonic()))
    app = SimpleNamespace(state=SimpleNamespace(bridge=bridge, closing=threading.Event()))
    uvicorn_server = SimpleNamespace(should_exit=False)
    watcher = threading.Thread(target=server_module._close_before_grace_ends, args=(uvicorn_server, app, 0.01))
    watcher.start()
    time.sleep(0.2)
    assert not closed and not app.state.closing.is_set()  # not before shutdown begins
    start = time.monotonic()
    uvicorn_server.should_exit = True
    watcher.join(5)
    assert not watcher.is_alive() and app.state.closing.is_set()
    if busy:
        assert len(closed) == 1 and 0.25 <= closed[0] - start < 0.6
    else:
        assert not closed


def test_a_body_still_arriving_when_the_server_closes_is_refused_with_503(tiny):
    with serving(tiny.model, tiny.tok) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as client:
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 100\r\n\r\n{\"prompt\":")
            time.sleep(0.3)
            server.app.state.closing.set()  # what the server does shortly before its grace period ends
            response = client.recv(65536)
            while b"\r\n\r\n" not in response or response.endswith(b"\r\n\r\n"):  # the body may come apart
                more = client.recv(65536)
                if not more:
                    break
                response += more
            head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
    assert json.loads(body)["error"]["message"] == "the server is shutting down"


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_binding_beyond_loopback_without_a_key_warns(monkeypatch, caplog):
    from trellis.serve import server as server_module

    monkeypatch.setattr(server_module.uvicorn.Server, "run", lambda self, sockets=None: None)
    _, model = tiny_pair()
    with caplog.at_level("WARNING", logger="trellis.serve"):
        server_module.serve(model, char_tokenizer(), ServeConfig(), host="0.0.0.0")
        assert "without --api-key" in caplog.text
        caplog.clear()
        server_module.serve(model, char_tokenizer(), ServeConfig(api_key="key"), host="0.0.0.0")
        for host in ("127.0.0.1", "::1", "localhost"):
            server_module.serve(model, char_tokenizer(), ServeConfig(), host=host)
        assert "without --api-key" not in caplog.text


@pytest.mark.parametrize("grid", [False, True], ids=["serve", "grid-serve"])
def test_a_busy_port_is_refused_before_the_model_loads(monkeypatch, capsys, grid):
    from trellis import cli

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model, or started a stage, for a port it cannot serve on")

    monkeypatch.setattr(cli, "load_model", no_loading)
    monkeypatch.setattr(cli, "run_grid_serve", no_loading)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        where = ["grid", "serve", "--stages", "2"] if grid else ["serve"]
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*where, "--port", str(port)])
    assert exit_info.value.code == 2 and f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
