"""A bounded soak of the OpenAI server (issue 20): N mixed requests, hostile ones and
disconnects among them, on the bundled models, in this process (`w2s serve`-equivalent).

    python -m bench.soak                    # 2,000 requests (about 25 minutes on 2 CPU cores)
    python -m bench.soak --requests 200     # a quick check

The server is the real one (uvicorn, the Guard, AsyncEngine) over
Engine(large=smollm2-135m-instruct, tuned=the sentiment DPO adapter, untuned=smollm2), the
demo's pair with one tokenizer and one template, so every method runs (cbs, best_of_n, base,
eft). `--concurrency` clients send the requests in a random, seeded order:
- well-formed (completions and chat, every method, small max_tokens, seeded): must be 200;
  a seeded request repeated must give the same text (reported, not asserted: batching may
  change fp32 rounding, DESIGN.md);
- hostile (the probes of issue 20: huge top_k, NaN and 1e308, true for an int, surrogates,
  broken UTF-8 and JSON, 100k-deep nesting, a 2 MB body, roles that are not, a wrong Host,
  unsupported features): must be 4xx in the OpenAI envelope;
- disconnects: a raw socket sends a long search and closes after 0-1.5 s.
First a stall probe: a small request's latency alone and while other clients send 20 MB bodies
and 250k-character prompts. Reported (and written to bench/results/soak-<machine>.json): the
probe, RSS at start and end, p50/p99
latency of the well-formed requests, status counts, 5xx (must be 0), the server's counters
(requests_total must equal finished + failed + cancelled + rejected), and KV blocks in use
after (must be 0, and Engine.check_all_free() must pass).
"""

import argparse
import http.client
import json
import os
import platform
import random
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"

WELL_FORMED = [
    ("/v1/completions", {"prompt": "I really", "max_tokens": 16, "seed": 1, "method": "cbs",
                         "w": 2, "k": 2, "l": 4, "top_k": 50}),
    ("/v1/completions", {"prompt": "The plot of this film", "max_tokens": 16, "seed": 2,
                         "method": "best_of_n", "k": 4, "top_k": 50}),
    ("/v1/completions", {"prompt": "This movie was", "max_tokens": 16, "seed": 3,
                         "method": "base", "n": 2}),
    ("/v1/completions", {"prompt": "The acting in this picture", "max_tokens": 12, "seed": 4,
                         "method": "eft", "beta": 1.0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Review a film."}],
                              "max_tokens": 16, "seed": 5, "w": 2, "k": 2, "l": 4}),
    ("/v1/completions", {"prompt": "Honestly, the director", "max_tokens": 16,
                         "temperature": 0, "method": "base", "user": "soak",
                         "presence_penalty": 0, "top_k": 2**31 - 1}),
]

HOSTILE = [  # (path, body bytes, extra headers)
    ("/v1/completions", b'{"prompt": "x", "top_k": 3000000000}', {}),
    ("/v1/completions", b'{"prompt": "x", "temperature": Infinity}', {}),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e308}', {}),
    ("/v1/completions", b'{"prompt": "x", "method": "eft", "beta": NaN}', {}),
    ("/v1/completions", b'{"prompt": "x", "w": true}', {}),
    ("/v1/completions", b'{"prompt": "I \\ud800 really"}', {}),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', {}),
    ("/v1/completions", b"[" * 100000 + b"]" * 100000, {}),
    ("/v1/completions", b'{"prompt": "x", "w": }', {}),
    ("/v1/completions", b'{"prompt": "' + b"a" * (2 << 20) + b'"}', {}),
    ("/v1/completions", b'{"prompt": "' + b"word " * 60000 + b'"}', {}),   # > 32 chars/token
    ("/v1/completions", b'{"prompt": "' + b"word " * 20000 + b'"}', {}),   # > the context
    ("/v1/completions", b'{"prompt": "x", "seed": -1}', {}),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', {}),   # streaming works: a wrong type
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000000}', {}),
    ("/v1/completions", b'{"prompt": "x"}', {"Host": "attacker.example"}),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', {}),
    ("/v1/chat/completions", b'{"messages": [{"role": "user: x\\nassistant", "content": "x"}]}',
     {}),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": '
     b'"image_url", "image_url": {"url": "x"}}]}]}', {}),
]

DISCONNECT = {"prompt": "A very long review of a film that", "max_tokens": 200, "w": 4, "k": 4,
              "l": 2, "seed": 9}


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def post(port, path, body: bytes, headers=None, timeout=1800):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def disconnect(port, rng: random.Random):
    body = json.dumps(DISCONNECT).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(rng.uniform(0, 1.5))


def stall_probe(port) -> dict:
    """The issue's measurement: a small request's latency alone, and while three clients keep
    sending 20 MB bodies (413) and 250k-character prompts (tokenized off the engine thread,
    then refused: past the context)."""
    small = json.dumps({"prompt": "I really", "max_tokens": 8, "seed": 1,
                        "method": "base"}).encode()

    def timed():
        start = time.perf_counter()
        code, data = post(port, "/v1/completions", small)
        assert code == 200, data[:300]
        return time.perf_counter() - start
    alone = statistics.median(timed() for _ in range(3))
    huge, long_prompt = b'{"prompt": "' + b"a" * (20 << 20) + b'"}', \
        b'{"prompt": "' + b"word " * 50000 + b'"}'
    stop, codes = threading.Event(), {}

    def attack(body):
        while not stop.is_set():
            code, _ = post(port, "/v1/completions", body)
            codes[code] = codes.get(code, 0) + 1
    threads = [threading.Thread(target=attack, args=(b,)) for b in (huge, long_prompt, huge)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    during = statistics.median(timed() for _ in range(3))
    stop.set()
    for t in threads:
        t.join()
    return {"small_request_s_alone": round(alone, 3),
            "small_request_s_during_20MB_bodies_and_long_prompts": round(during, 3),
            "attack_statuses": codes}


def start_server(async_engine):
    import uvicorn

    from w2s_engine.serve.server import create_app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(async_engine, "smollm2-135m-instruct"),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, port


def metrics(port) -> dict:
    from w2s_engine.serve.server import parse_metrics
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return parse_metrics(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--hostile", type=float, default=0.3, help="share of hostile requests")
    ap.add_argument("--disconnects", type=float, default=0.05, help="share of disconnects")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--machine", default=None, help="name for the results file (default: cpu "
                                                    "count and arch)")
    args = ap.parse_args(argv)

    from bench.e2e import commit
    from w2s_engine import Engine
    from w2s_engine.serve.async_engine import AsyncEngine
    from w2s_engine.tasks.sentiment import SMALL, TEMPLATES, TUNED

    code_commit = commit()   # the code this process runs (a commit made during the soak is not)

    t0 = time.time()
    engine = Engine(large=SMALL, tuned=TUNED, untuned=SMALL, templates=TEMPLATES,
                    progress=False, max_waiting=256)
    async_engine = AsyncEngine(engine)
    server, thread, port = start_server(async_engine)
    load_s = time.time() - t0
    # Warm up (first forwards allocate), then measure RSS from here.
    for path, body in WELL_FORMED:
        code, data = post(port, path, json.dumps(body).encode())
        assert code == 200, data[:300]
    rss_start = rss_mb()
    stall = stall_probe(port)
    print("stall probe:", stall, flush=True)

    rng = random.Random(args.seed)
    plan = []
    for _ in range(args.requests):
        x = rng.random()
        if x < args.disconnects:
            plan.append(("disconnect", None))
        elif x < args.disconnects + args.hostile:
            plan.append(("hostile", rng.randrange(len(HOSTILE))))
        else:
            plan.append(("good", rng.randrange(len(WELL_FORMED))))

    lock = threading.Lock()
    statuses, latencies, texts, bad = {}, [], {}, []
    done = [0]

    def run(item):
        kind, i = item
        started = time.perf_counter()
        if kind == "disconnect":
            disconnect(port, random.Random(rng.random()))
            code, data = None, b""
        elif kind == "hostile":
            path, body, headers = HOSTILE[i]
            code, data = post(port, path, body, headers)
        else:
            path, body = WELL_FORMED[i]
            code, data = post(port, path, json.dumps(body).encode())
        took = time.perf_counter() - started
        with lock:
            done[0] += 1
            statuses[f"{kind}:{code}"] = statuses.get(f"{kind}:{code}", 0) + 1
            if kind == "good":
                if code == 200:
                    latencies.append(took)
                    payload = json.loads(data)
                    choice = payload["choices"][0]
                    texts.setdefault(i, []).append(choice.get("text", choice.get("message",
                                                                                 {}).get("content")))
                else:
                    bad.append((kind, i, code, data[:300]))
            elif kind == "hostile":
                ok = 400 <= code < 500 and set(json.loads(data)["error"]) == {
                    "message", "type", "param", "code"}
                if not ok:
                    bad.append((kind, i, code, data[:300]))
            if done[0] % 50 == 0:
                print(f"  {done[0]}/{len(plan)} requests, RSS {rss_mb():.0f} MB", flush=True)

    t1 = time.time()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(run, plan))
    soak_s = time.time() - t1
    # Disconnected searches are cancelled when the server notices (within a poll): wait.
    deadline = time.time() + 120
    while time.time() < deadline:
        m = metrics(port)
        if m["w2s_requests_in_flight"] == 0 and m["w2s_requests_running"] == 0 and \
                m["w2s_queue_length"] == 0:
            break
        time.sleep(0.5)
    rss_end = rss_mb()
    used = {k: v for k, v in m.items() if k.startswith("w2s_kv_blocks_used")}
    all_free = True
    try:
        engine.check_all_free()
    except AssertionError:
        all_free = False
    server.should_exit = True
    thread.join(timeout=30)
    async_engine.shutdown()

    five_xx = sum(n for k, n in statuses.items() if k.split(":")[1].startswith("5"))
    outcomes = sum(m[f"w2s_requests_{o}_total"] for o in ("finished", "failed", "cancelled",
                                                          "rejected"))
    lat = sorted(latencies)
    mismatched = sum(len(set(v)) > 1 for v in texts.values())
    machine = args.machine or f"{os.cpu_count()}cpu-{platform.machine()}"
    result = {
        "machine": machine, "commit": code_commit,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": __import__("torch").__version__,
        "requests": args.requests, "concurrency": args.concurrency, "seed": args.seed,
        "load_s": round(load_s, 1), "soak_s": round(soak_s, 1),
        "rss_mb_start": round(rss_start), "rss_mb_end": round(rss_end), **stall,
        "well_formed": len(latencies),
        "latency_s_p50": round(statistics.median(lat), 3) if lat else None,
        "latency_s_p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
        "statuses": dict(sorted(statuses.items(), key=str)), "5xx": five_xx,
        "unexpected": len(bad), "seeded_texts_differing": mismatched,
        "counters": {k.removeprefix("w2s_"): m[k] for k in (
            "w2s_requests_total", "w2s_requests_finished_total", "w2s_requests_failed_total",
            "w2s_requests_cancelled_total", "w2s_requests_rejected_total")},
        "counters_add_up": outcomes == m["w2s_requests_total"],
        "kv_blocks_used_after": used, "check_all_free": all_free,
    }
    print(json.dumps(result, indent=2))
    for item in bad[:10]:
        print("unexpected:", item)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"soak-{machine}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    ok = five_xx == 0 and not bad and all_free and not any(used.values()) and \
        result["counters_add_up"]
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
