"""A bounded local load test of the web demo: N users chatting at once with one model on 127.0.0.1.

    python bench/load_test_web.py --checkpoint outputs/tiny_stage2/export --users 1 2 4 8 --out r.json  # CPU
    python bench/load_test_web.py --config 13b_stage2 --checkpoint EXPORT --device cuda --users 1 4 16

The demo's server (chatterbox.serve.web: ThreadingHTTPServer, `ChatService`, requests taking turns at the
model through `ModelQueue`) runs in this process on a free port; each simulated user is a thread that
uploads its own image (a synthetic scene) and asks ``--rounds`` questions one after another over HTTP,
alternating a grounding question ("Where is the <colour> <kind>?" with ``ground``) and a region question
("What is it <bbox>?" on a shape's box). Users start together. Per user count: the latency of each round
as the user sees it (request sent -> reply parsed), its p50 / p95 per round index and over all rounds, the
time spent waiting for the model (the reply's ``queue.waited_s``), and the rounds answered per second.
Replies have the model's own length (a trained export stops by itself; random weights run to
``chat.max_new_tokens``). Results go to --out as JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def post(url: str, body: bytes, content_type: str) -> dict:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def user(base_url: str, scene, rounds: int, seed: int, out: list) -> None:
    from chatterbox.data.synthetic import render_scene

    buffer = io.BytesIO()
    render_scene(scene).save(buffer, format="PNG")
    session = post(f"{base_url}/api/sessions", buffer.getvalue(), "image/png")["session"]
    rng = random.Random(seed)
    for r in range(rounds):
        shape = rng.choice(scene.shapes)
        if r % 2 == 0:
            body = {"question": f"Where is the {shape.name}?", "ground": True}
        else:
            body = {"question": "What is it <bbox>?", "boxes": [list(shape.box_xyxy_abs)]}
        started = time.perf_counter()
        reply = post(f"{base_url}/api/sessions/{session}/ask", json.dumps(body).encode(), "application/json")
        out.append({"round": r + 1, "latency_s": time.perf_counter() - started, "waited_s": reply["queue"]["waited_s"],
                    "tokens": reply["stats"]["generated_tokens"]})


def run_users(base_url: str, scenes, users: int, rounds: int) -> dict:
    records: list[list[dict]] = [[] for _ in range(users)]
    threads = [threading.Thread(target=user, args=(base_url, scenes[u % len(scenes)], rounds, u, records[u]))
               for u in range(users)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    flat = [r for per_user in records for r in per_user]
    if len(flat) != users * rounds:
        raise RuntimeError(f"{users * rounds - len(flat)} of {users * rounds} rounds got no reply")
    latencies = [r["latency_s"] for r in flat]
    by_round = {}
    for r in range(1, rounds + 1):
        values = [x["latency_s"] for x in flat if x["round"] == r]
        by_round[r] = {"p50_s": percentile(values, 0.5), "p95_s": percentile(values, 0.95)}
    return {"users": users, "rounds_per_user": rounds, "wall_s": wall, "rounds_per_s": len(flat) / wall,
            "latency_p50_s": percentile(latencies, 0.5), "latency_p95_s": percentile(latencies, 0.95),
            "waited_mean_s": statistics.mean(r["waited_s"] for r in flat),
            "tokens_mean": statistics.mean(r["tokens"] for r in flat), "by_round": by_round, "rounds": records}


def load_model(args):
    """The export at --checkpoint (as the demo loads it), or a freshly built tiny model with random weights."""
    from chatterbox.config import load_config
    from chatterbox.model.chatterbox import ChatterBox

    cfg = load_config(args.config, args.overrides)
    if args.checkpoint:
        return ChatterBox.from_pretrained(args.checkpoint, device=args.device), cfg
    from bench_chat import build_model

    import torch

    model, _ = build_model(argparse.Namespace(preset="tiny", tokenizer=""), torch.device(args.device), torch.float32)
    return model, cfg


def main(argv=None) -> int:
    from chatterbox.data.synthetic import make_scenes
    from chatterbox.serve.web import ChatService, make_server
    from results import machine_fields, write_json

    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny_stage2", help="the chat settings (chat.max_new_tokens)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set chat.max_new_tokens=16")
    parser.add_argument("--checkpoint", default="", help="an export; default: the tiny preset, random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    model, cfg = load_model(args)
    scenes = make_scenes(64, 1.0, seed=7)
    service = ChatService(model, max_new_tokens=cfg.chat.max_new_tokens, max_sessions=max(args.users),
                          max_waiting=max(args.users))
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = "http://{}:{}".format(*server.server_address[:2])
    try:
        run_users(base_url, scenes, 1, 2)  # warm-up
        results = []
        for n in args.users:
            result = run_users(base_url, scenes, n, args.rounds)
            results.append(result)
            print(f"{n} user(s): p50 {result['latency_p50_s']:.3f} s, p95 {result['latency_p95_s']:.3f} s per round, "
                  f"waiting {result['waited_mean_s']:.3f} s on average, {result['rounds_per_s']:.2f} rounds/s",
                  flush=True)
    finally:
        server.shutdown()
        server.server_close()
    report = {**machine_fields(torch.device(args.device)), "checkpoint": args.checkpoint or "tiny, random weights",
              "max_new_tokens": cfg.chat.max_new_tokens, "results": results}
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
