"""xlab-serve over a real socket with the real `openai` client: texts equal the library's, streamed equals
non-streamed, concurrent requests are batched and each gets its own text, bad requests get OpenAI-style 4xx
errors and break nothing, the API key is enforced, the bounds hold."""
import contextlib
import json
import socket
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
try:  # the HTTP client under `openai`: httpx2 from openai 3, httpx before
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

from xlabml import inference  # noqa: E402
from xlabml.models import XLabModel  # noqa: E402
from xlabml.serve import cli  # noqa: E402
from xlabml.serve.app import Limits, create_app  # noqa: E402
from xlabml.serve.chat import FALLBACK_STOP, render_chat  # noqa: E402
from xlabml.tokenizer import TokenizerTrainer  # noqa: E402

N_VOCAB, BLOCK = 300, 32
LIMITS = Limits(max_tokens=40, max_prompt_tokens=80, max_n=4, max_batch=16, max_queue=24, max_body_bytes=4096)
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hex bold jumping zebras".split()


def corpus():
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 6)) + (". " if i % 2 else " é€!")
            for i in range(200)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a second on short documents (<sos> text <eos>): it writes words and ends
    documents, so outputs have <eos> and stop strings to find. Served and compared in float64."""
    tmp = tmp_path_factory.mktemp("serve")
    texts = corpus()
    tokenizer = TokenizerTrainer().train(texts, N_VOCAB, tmp / "tok.model")
    torch.manual_seed(0)
    model = XLabModel(N_VOCAB, BLOCK, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, position="rope",
                      n_kv_heads=2)
    data = torch.full((len(texts), BLOCK + 1), tokenizer.pad_id)
    for i, text in enumerate(texts):
        ids = ([tokenizer.sos_id] + tokenizer.encode(text) + [tokenizer.eos_id])[:BLOCK + 1]
        data[i, :len(ids)] = torch.tensor(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(80):
        batch = data[torch.randint(0, len(texts), (32,), generator=generator)]
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten(), ignore_index=3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1.0
    ckpt = tmp / "tiny.ckpt"  # the layout of a training checkpoint, for the command-line test
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "datamodule_hyper_parameters": {"tokenizer_path": tokenizer.path, "seq_len": BLOCK},
                "XLabDataModule": {"tokenizer_hash": tokenizer.content_hash, "tokenizer_path": tokenizer.path}},
               ckpt)
    # float64: batched and lone logits agree far below any gap between two candidates
    model = model.double().eval().requires_grad_(False)
    excluded = [tokenizer.sos_id, tokenizer.pad_id]
    return SimpleNamespace(tmp=tmp, tokenizer=tokenizer, model=model, ckpt=str(ckpt), excluded=excluded)


@contextlib.contextmanager
def running(app):
    """Serves `app` on a free port of 127.0.0.1 in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def server(trained):
    app = create_app(trained.model, trained.tokenizer, name="tiny", limits=LIMITS)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield SimpleNamespace(url=url, engine=app.state.engine, client=client, **vars(trained))


def reference(t, ids, max_tokens, seed=None, stop=(), strip=False, **sampling):
    """(text, finish_reason, completion_tokens) from `inference.sample` alone: the text of the tokens before
    <eos>, cut before the first stop string, at the first token whose text completes one."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out = inference.sample(t.model, torch.tensor(ids), max_tokens, BLOCK, exclude_classes=t.excluded,
                           generator=generator, **sampling).tolist()
    eos = t.tokenizer.eos_id
    new = out[:out.index(eos)] if eos in out else out
    for k in range(1, len(new) + 1):
        text = t.tokenizer.decode(new[:k])
        found = [text.find(s) for s in stop if s in text]
        if found:
            text = text[:min(found)]
            return (text.strip() if strip else text), "stop", k
    text = t.tokenizer.decode(new)
    return (text.strip() if strip else text), ("stop" if eos in out else "length"), min(len(new) + 1, max_tokens)


def prompt_ids(t, text):
    return [t.tokenizer.sos_id] + t.tokenizer.encode(text)


def call(client, kind, stream=False, **params):
    """(texts by choice, finish reasons, (prompt_tokens, completion_tokens)) of one request, streamed or not."""
    chat = kind == "chat"
    create = client.chat.completions.create if chat else client.completions.create
    if not stream:
        r = create(**params)
        choices = sorted(r.choices, key=lambda c: c.index)
        texts = [c.message.content if chat else c.text for c in choices]
        return texts, [c.finish_reason for c in choices], (r.usage.prompt_tokens, r.usage.completion_tokens)
    texts, reasons, usage = defaultdict(str), {}, None
    for chunk in create(stream=True, stream_options={"include_usage": True}, **params):
        if chunk.usage is not None:
            usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for c in chunk.choices:
            piece = (c.delta.content if chat else c.text) or ""
            assert c.index not in reasons  # nothing after a choice's end
            texts[c.index] += piece
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return [texts[i] for i in sorted(reasons)], [reasons[i] for i in sorted(reasons)], usage


# ---------------------------------------------------------------------------------------------------------------


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    assert server.client.models.retrieve("tiny").id == "tiny"
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "model": "tiny", "live_choices": 0, "waiting_choices": 0}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt, params", [
    ("the quick", {"temperature": 0, "max_tokens": 30}),
    ("seven", {"temperature": 0.9, "seed": 3, "max_tokens": 40}),
    ("", {"temperature": 1.3, "top_p": 0.8, "seed": 11, "max_tokens": 5}),
    ("a lazy", {"seed": 5, "max_tokens": 25, "stop": [" over", "zz"]}),
])
def test_completion_equals_the_library(server, prompt, params, stream):
    ids = prompt_ids(server, prompt)
    sampling = {k: v for k, v in params.items() if k in ("temperature", "top_p")}
    expected = reference(server, ids, params["max_tokens"], params.get("seed"), params.get("stop", ()), **sampling)
    texts, reasons, usage = call(server.client, "completion", stream, model="tiny", prompt=prompt, **params)
    assert (texts[0], reasons[0], usage) == (expected[0], expected[1], (len(ids), expected[2]))


def test_streamed_equals_non_streamed_and_finish_reasons_vary(server):
    seen = set()
    for seed in range(6):
        params = dict(model="tiny", prompt="over the", max_tokens=12, temperature=1.0, seed=seed, stop="ju")
        plain = call(server.client, "completion", **params)
        assert call(server.client, "completion", stream=True, **params) == plain
        seen.add(plain[1][0])
        chat = dict(model="tiny", messages=[{"role": "user", "content": "fox"}], max_tokens=12, seed=seed)
        assert call(server.client, "chat", stream=True, **chat) == call(server.client, "chat", **chat)
    assert seen == {"stop", "length"}


def test_stop_string_across_tokens_is_never_sent(server):
    ids = prompt_ids(server, "the quick")
    full = reference(server, ids, 30, temperature=0)[0]
    stop = full[5:8]  # spans tokens: the model writes short pieces
    assert len(server.tokenizer.encode(stop)) > 1
    expected = reference(server, ids, 30, stop=[stop], temperature=0)
    for stream in (False, True):
        texts, reasons, usage = call(server.client, "completion", stream, model="tiny", prompt="the quick",
                                     max_tokens=30, temperature=0, stop=stop)
        assert (texts[0], reasons[0], usage[1]) == expected
        assert texts[0] == full[:full.index(stop)] and stop not in texts[0]


def test_n_choices_draw_from_seed_plus_index(server):
    ids = prompt_ids(server, "hex")
    expected = [reference(server, ids, 20, seed=40 + k, temperature=2.0) for k in range(3)]
    for stream in (False, True):
        texts, reasons, usage = call(server.client, "completion", stream, model="tiny", prompt="hex", n=3,
                                     max_tokens=20, temperature=2.0, seed=40)
        assert list(zip(texts, reasons)) == [e[:2] for e in expected]
        assert usage == (len(ids), sum(e[2] for e in expected))
    assert len({e[0] for e in expected}) > 1


def test_prompt_lists_token_ids_and_echo(server):
    ids = server.tokenizer.encode("seven bold")  # token ids are taken as they are: no <sos>
    for prompts, full in (([ids, ids[:1]], [ids, ids[:1]]), (["seven bold", "zebras"], None)):
        full = full or [prompt_ids(server, p) for p in prompts]
        r = server.client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=9, seed=1, echo=True)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        for i, prompt in enumerate(full):
            for k in range(2):  # choice 2i+k: prompt i, seed 1 + 2i + k
                expected = reference(server, prompt, 9, seed=1 + 2 * i + k)
                assert r.choices[2 * i + k].text == server.tokenizer.decode(prompt) + expected[0]
        assert r.usage.prompt_tokens == sum(map(len, full))
    zero = server.client.completions.create(model="tiny", prompt="fox", max_tokens=0)
    assert (zero.choices[0].text, zero.choices[0].finish_reason, zero.usage.completion_tokens) == ("", "length", 0)


def test_chat_uses_the_plain_fallback_template(server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"},
                {"role": "assistant", "content": "jumps"}, {"role": "user", "content": [{"type": "text", "text": "a"}]}]
    chat = render_chat([(m["role"], m["content"] if isinstance(m["content"], str) else "a") for m in messages],
                       server.tokenizer)
    for seed in range(4):
        expected = reference(server, chat.ids, 30, seed=seed, stop=FALLBACK_STOP, strip=True)
        texts, reasons, usage = call(server.client, "chat", model="tiny", messages=messages, max_tokens=30,
                                     seed=seed)
        assert (texts[0], reasons[0], usage) == (expected[0], expected[1], (len(chat.ids), expected[2]))
    default = server.client.chat.completions.create(model="tiny", messages=messages[-1:], temperature=0)
    assert default.usage.completion_tokens <= LIMITS.max_tokens  # chat's default max_tokens: the server's bound


def test_chat_template_reply_ends_at_a_role_token(trained):
    # a chat-tuned checkpoint (its data format says so) is prompted through its template, and a reply ends where the
    # model starts a new turn: here it is rigged to open one at once (the <|user|> row of the head made the winner)
    import copy

    from xlabml.chat import chat_template
    checkpoint = SimpleNamespace(data_hparams={"format": "chat"}, tokenizer=trained.tokenizer)
    template = chat_template(checkpoint)
    prompt = render_chat([("user", "the fox")], trained.tokenizer, checkpoint)
    assert prompt.ids[-1] == template.role_ids["assistant"] and prompt.stop == []
    assert sorted(prompt.stop_ids) == sorted(template.role_ids.values())
    model = copy.deepcopy(trained.model)
    user = template.role_ids["user"]
    with torch.no_grad():
        logits = model(torch.tensor(prompt.ids)[None])[0, -1]
        logits[trained.excluded] = -torch.inf
        first = int(logits.argmax())  # greedy's first token; its logit is the largest
        head = model.model.head.weight
        head[user] = 3 * torch.sign(logits[first]) * head[first]
        assert int(model(torch.tensor(prompt.ids)[None])[0, -1].argmax()) == user
    app = create_app(model, trained.tokenizer, name="chat", limits=LIMITS, checkpoint=checkpoint)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for stream in (False, True):
            texts, reasons, usage = call(client, "chat", stream=stream, model="chat", temperature=0, max_tokens=20,
                                         messages=[{"role": "user", "content": "the fox"}])
            assert (texts, reasons, usage) == ([""], ["stop"], (len(prompt.ids), 1)), stream


SIXTEEN = [  # (kind, stream, params): greedy and sampled, both endpoints, streamed or not, stop strings, n
    ("completion" if i % 3 else "chat", i % 2 == 0,
     dict({"prompt": " ".join(WORDS[i:i + 1 + i % 4])} if i % 3 else
          {"messages": [{"role": "user", "content": WORDS[i]}]},
          model="tiny", max_tokens=8 + 2 * i, seed=1000 + i, temperature=0 if i % 5 == 0 else 0.6 + 0.05 * i,
          **({"stop": "o"} if i % 4 == 1 else {})))
    for i in range(16)
]


def test_sixteen_concurrent_requests_are_batched_and_each_gets_its_own_text(server):
    alone = [call(server.client, kind, stream, **params) for kind, stream, params in SIXTEEN]
    for (kind, _, params), result in zip(SIXTEEN, alone):  # the single-request results are the library's
        if kind == "completion":
            ids = prompt_ids(server, params["prompt"])
            text, reason, tokens = reference(server, ids, params["max_tokens"], params["seed"],
                                             [params["stop"]] if "stop" in params else (),
                                             temperature=params["temperature"])
            assert result == ([text], [reason], (len(ids), tokens))
    assert len({r[0][0] for r in alone}) >= 12  # a mix-up between requests would show
    bad = [  # answered while the sixteen wait: the event loop is never blocked, and nothing breaks
        ({"model": "other", "prompt": "a"}, 404, "model 'other' does not exist"),
        ({"model": "tiny", "prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "the " * 60}, 400, "this server accepts at most 80"),
        (b'{"model": "tiny", "prompt": ', 400, "malformed JSON"),
    ]
    server.engine.peak_rows = 0
    with ThreadPoolExecutor(16) as pool:
        with server.engine.held():
            futures = [pool.submit(call, server.client, kind, stream, **params) for kind, stream, params in SIXTEEN]
            for body, status, message in bad:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = httpx.post(server.url + "/v1/completions", content=content,
                               headers={"Content-Type": "application/json"})
                assert r.status_code == status and message in r.json()["error"]["message"]
            deadline = time.monotonic() + 30
            while server.engine.waiting_rows < 16:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        results = [f.result() for f in futures]
    assert results == alone
    assert server.engine.peak_rows == 16  # all sixteen generated together
    assert call(server.client, *SIXTEEN[3][:2], **SIXTEEN[3][2]) == alone[3]


def test_requests_joining_a_running_batch_get_their_own_text(server):
    """Staggered arrivals: each joins the rows already generating (continuous batching)."""
    params = [dict(model="tiny", prompt=WORDS[i], max_tokens=40, seed=i, temperature=0.8, stop="zzz")
              for i in range(6)]
    alone = [call(server.client, "completion", **p) for p in params]
    server.engine.peak_rows = 0

    def late(i):
        time.sleep(0.003 * i)
        return call(server.client, "completion", i % 2 == 1, **params[i])

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(late, range(6))) == alone
    assert server.engine.peak_rows > 1


@pytest.mark.parametrize("body, status, message", [
    ({"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature: Input should be greater than or equal"),
    ({"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p: Input should be greater than 0"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 41}, 400, "max_tokens=41 exceeds this server's limit of 40"),
    ({"model": "tiny", "prompt": "a", "n": 5}, 400, "n=5 exceeds this server's limit of 4"),
    ({"model": "tiny", "prompt": ["a"] * 5, "n": 4}, 400, "asks for 20 choices; this server generates at most 16"),
    ({"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"model": "tiny", "prompt": "a", "stop": ""}, 400, "stop contains an empty string"),
    ({"model": "tiny", "prompt": [5, 300]}, 400, "prompt token id 300 is outside the vocabulary 0..299"),
    ({"model": "tiny", "prompt": []}, 400, "prompt is an empty list"),
    ({"model": "tiny", "prompt": [[1, "x"]]}, 400, "prompt: expected a string, a list of strings, a list of token"),
    ({"model": "tiny", "prompt": "a", "stop": 5}, 400, "stop: expected a string or a list of strings (got 5)"),
    ({"model": "tiny", "prompt": "a", "logprobs": 2}, 400, "logprobs=2 is not supported"),
    ({"model": "tiny", "prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty=0.5 is not supported"),
    ({"model": "tiny", "prompt": "a", "seed": "x"}, 400, "seed: Input should be a valid integer"),
    ({"model": "tiny"}, 400, "prompt: Field required"),
    ({"prompt": "a"}, 400, "model: Field required"),
    ([1, 2], 400, "the request body must be a JSON object"),
    ({"model": "tiny", "messages": []}, 400, "messages: List should have at least 1 item"),
    ({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role: Input should be"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, 400,
     "tools=[{\"type\": \"function\"}] is not supported"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "the " * 60}]}, 400, "accepts at most 80"),
    ({"model": "tiny", "prompt": "a" * 5000}, 413, "larger than this server's limit of 4096 bytes"),
])
def test_bad_requests_get_one_clear_openai_error(server, body, status, message):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    r = httpx.post(server.url + path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == status and message in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}
    assert call(server.client, "completion", model="tiny", prompt="a", max_tokens=3, temperature=0)[1] in (
        ["stop"], ["length"])  # still serving


def test_unknown_paths_methods_and_bodies_that_are_not_json(server):
    assert httpx.get(server.url + "/v2/nothing").json()["error"]["message"] == "GET /v2/nothing: Not Found"
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"}):  # no label, or curl -d's: JSON
        r = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny", "prompt": "a", "max_tokens": 2}',
                       headers=headers)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.models.retrieve("other")


def test_queue_bound_is_a_429_and_the_queued_requests_complete(server):
    params = dict(model="tiny", prompt="dog", n=4, max_tokens=6, seed=9)
    alone = call(server.client, "completion", **params)
    with ThreadPoolExecutor(6) as pool:
        with server.engine.held():
            futures = [pool.submit(call, server.client, "completion", **params) for _ in range(6)]
            deadline = time.monotonic() + 30
            while server.engine.waiting_rows < 24:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError, match="too many requests waiting"):
                server.client.completions.create(**params)
        assert [f.result() for f in futures] == [alone] * 6


def test_client_that_hangs_up_is_dropped(server):
    """A request whose client went away leaves the queue without being generated, streamed or not."""
    server.engine.peak_rows = 0
    with server.engine.held():
        with httpx.stream("POST", server.url + "/v1/completions", json={
                "model": "tiny", "prompt": "a", "max_tokens": 40, "stream": True}) as r:
            assert r.status_code == 200
        impatient = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model="tiny", prompt="b", max_tokens=40)
        deadline = time.monotonic() + 10
        while not all(job.cancelled for job in server.engine._waiting):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while server.engine.waiting_rows:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert server.engine.peak_rows == 0 and server.engine.live_rows == 0


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(server, monkeypatch):
    step, failures = inference.GenerationBatch.step, []

    def failing_once(batch):
        if not failures:
            failures.append(len(batch))
            raise RuntimeError("CUDA out of memory (simulated)")
        return step(batch)

    monkeypatch.setattr(inference.GenerationBatch, "step", failing_once)
    params = dict(model="tiny", prompt="fox", max_tokens=6, seed=2)
    with pytest.raises(openai.InternalServerError, match=r"generation failed \(RuntimeError: CUDA out of memory"):
        server.client.completions.create(**params)
    assert failures == [1] and server.engine.live_rows == 0
    expected = reference(server, prompt_ids(server, "fox"), 6, seed=2)
    assert call(server.client, "completion", True, **params) == ([expected[0]], [expected[1]],
                                                                  (len(prompt_ids(server, "fox")), expected[2]))


def test_api_key_is_required_when_set(trained):
    app = create_app(trained.model, trained.tokenizer, name="tiny", limits=LIMITS, api_key="s3cret")
    with running(app) as url:
        params = dict(model="tiny", prompt="fox", max_tokens=4, temperature=0)
        client = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as error:
            client.completions.create(**params)
        assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
        assert "incorrect API key" in error.value.body["message"]
        r = httpx.post(url + "/v1/completions", content=b"{not json")  # refused before the body is read
        assert r.status_code == 401 and "no API key given" in r.json()["error"]["message"]
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").json()["status"] == "ok"  # open: for load balancers
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(**params).choices[0].finish_reason in ("stop", "length")


def test_command_line_serves_a_checkpoint(trained, monkeypatch, capsys):
    """`xlab-serve CHECKPOINT` loads through the one loader (float32 here): its greedy text is the library's."""
    monkeypatch.setenv(cli.API_KEY_ENV, "from-env")
    args = cli.build_parser().parse_args([trained.ckpt, "--max-tokens", "20", "-d", "cpu"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, "from-env")
    app = cli.build(args)
    model = app.state.engine.model
    assert next(model.parameters()).dtype == torch.float32
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="from-env", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.completions.create(model="tiny", prompt="the quick", max_tokens=20, temperature=0)
    ids = prompt_ids(trained, "the quick")
    out = inference.greedy_search(model, torch.tensor(ids), 20, BLOCK, eos_class=trained.tokenizer.eos_id,
                                  exclude_classes=trained.excluded)
    assert r.choices[0].text == trained.tokenizer.decode(out.tolist())
    with pytest.raises(openai.BadRequestError, match="max_tokens=21 exceeds this server's limit of 20"):
        with running(app) as url:
            openai.OpenAI(base_url=url + "/v1", api_key="from-env", max_retries=0).completions.create(
                model="tiny", prompt="a", max_tokens=21)


@pytest.mark.parametrize("argv, message", [
    (["missing.ckpt"], "checkpoint missing.ckpt not found"),
    (["{ckpt}", "-t", "{tmp}/nope.model"], "tokenizer model file not found"),
    (["{ckpt}", "--port", "70000"], "--port 70000 is not a port number"),
    (["{ckpt}", "--port", "{taken}"], "cannot listen on 127.0.0.1:{taken} (Address already in use)"),
])
def test_command_line_errors_are_one_line(trained, capsys, argv, message):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    argv = [a.format(ckpt=trained.ckpt, tmp=trained.tmp, taken=port) for a in argv]
    message = message.format(taken=port)
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    err = capsys.readouterr().err
    taken.close()
    assert exit.value.code == 1 and err.startswith("xlab-serve: error: ") and message in err, err
    assert err.count("\n") == 1


def test_command_line_serves_lora_adapters_merged(trained):
    """A LoRA run's checkpoint (adapters + a reference to its base) is served with the adapters folded into the
    base: no adapter layers left, and the logits of the adapted model."""
    from xlabml.lora import LoRALinear

    model = XLabModel(N_VOCAB, BLOCK, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, position="rope",
                      n_kv_heads=2, init_from=trained.ckpt, lora={"rank": 2, "targets": ["qkv", "ffn.fc"]})
    model.setup("fit")  # copies the base weights (init_from)
    torch.manual_seed(1)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            torch.nn.init.normal_(layer.lora_b, std=0.5)  # adapters that change the outputs
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "datamodule_hyper_parameters": {"tokenizer_path": trained.tokenizer.path, "seq_len": BLOCK},
                  "XLabDataModule": {"tokenizer_hash": trained.tokenizer.content_hash,
                                     "tokenizer_path": trained.tokenizer.path}}
    model.on_save_checkpoint(checkpoint)  # what Lightning calls: the adapters only, and the base's reference
    assert all("lora_" in key for key in checkpoint["state_dict"])
    path = trained.tmp / "adapters.ckpt"
    torch.save(checkpoint, path)
    served = cli.build(cli.build_parser().parse_args([str(path), "-d", "cpu"])).state.engine.model
    assert not any(isinstance(layer, LoRALinear) for layer in served.modules())
    x = torch.tensor([prompt_ids(trained, "the quick brown fox")])
    with torch.no_grad():
        expected, base = model.eval()(x), trained.model.float()(x)
        torch.testing.assert_close(served(x), expected, atol=1e-4, rtol=1e-5)  # merged: rounding differs
        assert (expected - base).abs().max() > 0.1  # the adapters matter
    trained.model.double()
